"""Load check of the browser app: concurrent gradio_client clients against a local server.

    python benchmarks/bench_app.py                       # 8 clients, 200 queries, default data set
    python benchmarks/bench_app.py --clients 2 --queries 20 --collection my.idx
    python benchmarks/bench_app.py --screenshot docs/app.png   # also the README's picture (needs chromium)

The server is ``utils_cv.similarity.app.serve`` in its own process (as ``utils-cv-similarity
serve`` runs it) over a collection of the default data set (built once into the user cache
unless ``--collection`` names one). Each client uploads images of the data set (seeded draw)
through the ``/search`` endpoint and downloads the result thumbnails, as a browser would.
Reported: latency per query (p50 / p95, seconds from upload to thumbnails on disk), errors
(must be 0), throughput, and the server's resident memory after one warm-up query, after half
of the load and after all of it (the second half should add little: the model and index are
loaded once, thumbnails are an LRU of bounded size, Gradio's file cache is on disk). Prints a markdown table and the command line that produced it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SERVER = ("import sys\n"
          "from utils_cv.similarity.app import serve\n"
          "serve(sys.argv[1], port=int(sys.argv[2]), concurrency=int(sys.argv[3]))\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collection(args) -> Path:
    from utils_cv.common.paths import cache_dir
    from utils_cv.similarity import collection, data

    if args.collection:
        return Path(args.collection)
    out = cache_dir("collections", "bench_app_default")
    collection.index_folder(data.default_dataset(), out, progress=False)  # a re-run reuses every row
    return out


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not answer within {timeout:.0f} s")


def _screenshot(url: str, query: Path, dest: Path) -> None:
    """The Search tab after an upload, as a small PNG (headless Chromium from Debian)."""
    os.environ.setdefault("SE_OFFLINE", "true")
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,760",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            time.sleep(3)
            driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query))
            deadline = time.monotonic() + 60
            while "result" not in driver.find_element(By.ID, "status").text and time.monotonic() < deadline:
                time.sleep(0.25)
            time.sleep(2)  # thumbnails load
            png = Path(tempfile.mkstemp(suffix=".png")[1])
            driver.save_screenshot(str(png))
        finally:
            driver.quit()
    im = Image.open(png).convert("RGB")
    im.thumbnail((960, 960))
    im = im.quantize(colors=128)  # a screenshot: few colours, small file
    dest.parent.mkdir(parents=True, exist_ok=True)
    im.save(dest, optimize=True)
    png.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queries", type=int, default=200, help="queries in all, shared among the clients")
    p.add_argument("--concurrency", type=int, default=4, help="the server's concurrent searches (its default)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--collection", help="a collection folder (default: the default data set, indexed once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screenshot", help="also write a PNG of the app (needs /usr/bin/chromium)")
    args = p.parse_args(argv)

    import psutil
    from gradio_client import Client, handle_file

    from utils_cv.similarity import collection

    col_dir = _collection(args)
    col = collection.open_collection(col_dir)
    rng = np.random.default_rng(args.seed)
    queries = [col.abspath(col.entries[i]["path"]) for i in rng.integers(0, len(col.entries), args.queries)]
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GRADIO_TEMP_DIR=str(Path(tmp) / "server-cache"))
        log = open(Path(tmp) / "server.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(col_dir), str(port), str(args.concurrency)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            started = time.perf_counter()
            _wait_ready(url, proc)
            startup = time.perf_counter() - started
            server = psutil.Process(proc.pid)
            Client(url, verbose=False, download_files=str(Path(tmp) / "warm")).predict(
                handle_file(str(queries[0])), args.k, 2, api_name="/search")
            rss_before = server.memory_info().rss

            def run(client_no: int, part: list):
                client = Client(url, verbose=False, download_files=str(Path(tmp) / f"client{client_no}"))
                times, errors = [], []
                for q in part[client_no::args.clients]:
                    t = time.perf_counter()
                    try:
                        gallery, _ = client.predict(handle_file(str(q)), args.k, 2, api_name="/search")
                        if len(gallery) != min(args.k, len(col.entries)):
                            raise RuntimeError(f"{len(gallery)} results")
                        times.append(time.perf_counter() - t)
                    except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                        errors.append(f"{q.name}: {exc}")
                return times, errors

            wall, results, rss = time.perf_counter(), [], []
            for half in (0, 1):  # two halves: the memory after each shows whether it still grows
                part = queries[half * len(queries) // 2:(half + 1) * len(queries) // 2]
                with ThreadPoolExecutor(args.clients) as pool:
                    results += list(pool.map(lambda c: run(c, part), range(args.clients)))
                rss.append(server.memory_info().rss)
            wall = time.perf_counter() - wall
            if args.screenshot:
                _screenshot(url, queries[0], Path(args.screenshot))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    times = np.array([t for r in results for t in r[0]])
    errors = [e for r in results for e in r[1]]
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    mb = 1 / 2**20
    cmd = "python benchmarks/bench_app.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    print(f"Browser app under load: {args.clients} concurrent gradio_client clients, {args.queries} queries "
          f"(upload + k={args.k} thumbnails), {len(col.entries)} indexed images ({col.index.backend}), server "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs; server ready in {startup:.1f} s.\n")
    print("| clients | queries | errors | p50 latency (s) | p95 latency (s) | queries / s | server RSS (MB): "
          "warm-up / half / end |")
    print("|---|---|---|---|---|---|---|")
    p50, p95 = (np.percentile(times, [50, 95]) if len(times) else (float("nan"),) * 2)
    print(f"| {args.clients} | {args.queries} | {len(errors)} | {p50:.2f} | {p95:.2f} | {len(times) / wall:.1f} "
          f"| {rss_before * mb:.0f} / {rss[0] * mb:.0f} / {rss[1] * mb:.0f} |")
    print(f"\ncommand: `{cmd}`")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
