"""The browser app: a real server process over a tiny collection, driven by a real headless
Chromium (Debian's ``chromium`` + ``chromium-driver``) and by raw HTTP requests.

Screenshots of each state are written under pytest's temporary folder (``--basetemp`` to keep
them somewhere known). The browser tests are marked ``browser`` (deselect with
``-m 'not browser'``) and skip only where /usr/bin/chromium is missing; ``.ci/run`` installs it.
"""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image_folder

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
MAX_PIXELS = 3_000_000  # the server's pixel limit here: the fake camera's 1920 x 1440 snapshot passes
SERVER = ("import logging, sys\n"
          "logging.basicConfig(level=logging.INFO)\n"
          "from utils_cv.similarity.app import serve\n"
          "serve(sys.argv[1], port=int(sys.argv[2]), max_upload_mb=1, max_pixels=int(sys.argv[3]))\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory) -> SimpleNamespace:
    from utils_cv.similarity import collection

    tmp = tmp_path_factory.mktemp("app")
    images = draw_image_folder(tmp / "images")
    collection.index_folder(images, tmp / "collection", progress=False)
    return SimpleNamespace(tmp=tmp, images=images, path=tmp / "collection")


@pytest.fixture(scope="module")
def server(collection_dir) -> SimpleNamespace:
    """``serve`` in its own process on a free localhost port, as the command line starts it."""
    import os

    port = _free_port()
    log = collection_dir.tmp / "server.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(collection_dir.tmp / "gradio-cache"))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(collection_dir.path), str(port), str(MAX_PIXELS)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the server did not answer in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield SimpleNamespace(url=url, port=port, log=log, **vars(collection_dir))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    import os

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium: never look for a driver online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate, timeout: float = 60, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _text(driver, css: str) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))
    except StaleElementReferenceException:  # the gallery re-rendered while being read
        return ""


def _captions(driver) -> list[tuple[float, str]]:
    """(distance, path) of each result in the gallery."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .caption-label")]
    except StaleElementReferenceException:
        return []
    return [(float(t.split()[0]), t.split()[1]) for t in texts if len(t.split()) == 2]


def _open(driver, server):
    from selenium.webdriver.common.by import By

    driver.get(server.url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#query input[type=file]"), what="the app to render")


def _camera_ready(driver, elem_id: str) -> None:
    """Wait until the component's video shows frames of the (fake) camera."""
    script = f"const v = document.querySelector('#{elem_id} video'); return !!v && v.readyState >= 2 && v.videoWidth > 0;"
    _wait(lambda: driver.execute_script(script), what=f"the camera of #{elem_id}")


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(message["params"].get("request", {}).get("url") or message["params"].get("url", ""))
    return urls


@pytest.mark.browser
@needs_chromium
def test_upload_shows_the_nearest_file_and_nothing_leaves_localhost(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    browser.save_screenshot(str(tmp_path / "0_loaded.png"))
    query = server.images / "squares" / "squares_2.jpg"
    browser.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query))
    hits = _wait(lambda: _captions(browser), what="the results of the upload")
    browser.save_screenshot(str(tmp_path / "1_upload_results.png"))
    assert hits[0] == (0.0, "squares/squares_2.jpg")  # the image itself, at distance 0
    assert len(hits) == 8 and all(d >= 0 for d, _ in hits)
    assert re.fullmatch(r"8 result\(s\) in \d+ ms", _text(browser, "#status"))
    # result images are thumbnails from Gradio's cache, never the collection's files by path
    sources = [e.get_attribute("src") for e in browser.find_elements(By.CSS_SELECTOR, "#results img")]
    assert sources and all(s.startswith(server.url + "gradio_api/file=") and str(server.images) not in s
                           for s in sources)
    with urllib.request.urlopen(sources[0], timeout=10) as r:
        assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"  # a JPEG thumbnail is served
    # offline: every request of the page went to the app's own address (no CDN, no call home)
    urls = [u for u in _requested_urls(browser) if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    assert urls, "the performance log recorded no request"
    outside = sorted({u for u in urls if urlsplit(u).netloc != f"127.0.0.1:{server.port}"})
    assert not outside, outside


@pytest.mark.browser
@needs_chromium
def test_webcam_snapshot_and_live_mode_run_queries(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    known = {p.relative_to(server.images).as_posix() for p in server.images.rglob("*.jpg")}
    _open(browser, server)
    # snapshot: the query's camera source, Chromium's fake camera, one capture
    browser.find_element(By.CSS_SELECTOR, "#query button[aria-label='Capture from camera']").click()
    _wait(lambda: browser.find_elements(By.XPATH, "//*[@id='query']//button[contains(., 'Access Webcam')]"))[0].click()
    _camera_ready(browser, "query")
    browser.find_element(By.CSS_SELECTOR, "#query button.capture-button").click()
    _wait(lambda: re.fullmatch(r"\d+ result\(s\) in \d+ ms", _text(browser, "#status")), what="a snapshot query")
    hits = _wait(lambda: _captions(browser), what="the snapshot's results")
    browser.save_screenshot(str(tmp_path / "2_webcam_snapshot.png"))
    assert hits and {p for _, p in hits} <= known
    # live mode: frames are streamed and searched, throttled
    live = browser.find_element(By.ID, "live")
    live.find_element(By.XPATH, ".//button[contains(., 'Access Webcam')]").click()
    _camera_ready(browser, "live")
    live.find_element(By.CSS_SELECTOR, "button.capture-button").click()
    status = _wait(lambda: re.fullmatch(r"live: (\d+) result\(s\) in \d+ ms", _text(browser, "#status")),
                   what="a live query")
    hits = _wait(lambda: _captions(browser), what="the live results")
    browser.save_screenshot(str(tmp_path / "3_webcam_live.png"))
    assert int(status.group(1)) == 8 and hits and {p for _, p in hits} <= known


@pytest.mark.browser
@needs_chromium
def test_duplicates_and_index_tabs(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Duplicates')]").click()
    _wait(lambda: browser.find_elements(By.ID, "dup-button"))[0].click()
    text = _wait(lambda: re.search(r"(\d+) group\(s\) of near duplicates among 12 images",
                                         _text(browser, "#dup-text")),
                 what="the duplicate groups")
    browser.save_screenshot(str(tmp_path / "4_duplicates.png"))
    assert int(text.group(1)) >= 1  # drawn shapes of one class lie within the default threshold
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Index')]").click()
    facts = _wait(lambda: _text(browser, "#facts"), what="the index facts")
    browser.save_screenshot(str(tmp_path / "5_index.png"))
    assert "efficientnet_lite0" in facts and "exact" in facts and str(server.images) in facts


# ---------------------------------------------------------------------------- raw HTTP
def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET exactly ``path`` (no client-side normalisation of ``..`` or ``%2e``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_paths_from_the_browser_are_refused(server):
    image = server.images / "circles" / "circles_0.jpg"
    manifest = server.path / "collection.json"
    attempts = ["/gradio_api/file=../../../../../../etc/passwd", "/gradio_api/file=/etc/passwd",
                "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/gradio_api/file=..%2f..%2f..%2fetc%2fpasswd",
                "/gradio_api/file/../../../../etc/passwd", "/static/../../../../../etc/passwd",
                "/assets/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/file=/etc/passwd",
                f"/gradio_api/file={image}", f"/gradio_api/file={manifest}",
                f"/gradio_api/file={server.tmp}/gradio-cache/../collection/collection.json"]
    secret = image.read_bytes()
    for path in attempts:
        status, body = _raw_get(server.port, path)
        assert status in (400, 403, 404), (path, status, body[:200])
        assert b"root:" not in body and secret not in body and b'"entries"' not in body, path


def test_upload_limits(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    ok = client.predict(handle_file(str(server.images / "circles" / "circles_1.jpg")), 3, 2, api_name="/search")
    assert [c["caption"] for c in ok[0]][0] == "0.000  circles/circles_1.jpg"
    # over the pixel limit: refused, with a message that says why
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000), (10, 20, 30)).save(big)  # 4 Mpx > MAX_PIXELS in a few kB
    with pytest.raises(Exception, match="more than the app accepts"):
        client.predict(handle_file(str(big)), 3, 2, api_name="/search")
    # over max_upload_mb (1 MB): Gradio refuses the upload itself
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > 1_000_000
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(noise)), 3, 2, api_name="/search")


def test_service_refuses_a_model_other_than_the_collection_s(collection_dir, tmp_path):
    from utils_cv.similarity.app import SearchService

    other = tmp_path / "other.pth"
    other.write_bytes(b"not the model")
    with pytest.raises(ValueError, match="not the model the collection was built with"):
        SearchService(collection_dir.path, model=other)
