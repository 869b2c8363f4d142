"""download / extract against a real HTTP server on localhost and real archives."""
import hashlib
import http.server
import io
import os
import stat
import tarfile
import threading
import time
import warnings
import zipfile

import pytest

from utils_cv.common import download as dl

PAYLOAD = os.urandom(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/data.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/cut.bin":  # announces more than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.close_connection = True
        elif self.path == "/slow.bin":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/trickle.bin":  # one byte every 0.1 s for 15 s, no Content-Length
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(150):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            self.close_connection = True
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("UTILS_CV_OFFLINE", "0")


def _only(folder):
    return sorted(p.name for p in folder.iterdir())


def test_download_verifies_and_renames_into_place(server, tmp_path, online):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    got = dl.download(f"{server}/data.bin", tmp_path, sha256=digest, progress=False)
    assert got == tmp_path / "data.bin" and got.read_bytes() == PAYLOAD
    mtime = got.stat().st_mtime_ns
    assert dl.download(f"{server}/data.bin", got, sha256=digest, progress=False) == got
    assert got.stat().st_mtime_ns == mtime, "a complete file with the right checksum is not fetched again"


@pytest.mark.parametrize("path,match", [("/data.bin", "does not match"), ("/missing.bin", "HTTP status 404"),
                                        ("/cut.bin", "received 1000 bytes"), ("/slow.bin", "timeout")])
def test_failed_downloads_leave_nothing_that_looks_complete(server, tmp_path, online, path, match):
    with pytest.raises(dl.DownloadError, match=match) as err:
        dl.download(f"{server}{path}", tmp_path / "file.bin", sha256="0" * 64, timeout=1, progress=False)
    assert server in str(err.value)
    assert _only(tmp_path) == [], "no partial or unverified file left"


@pytest.mark.parametrize("deadline,match", [(1.5, "past the deadline of 1.5 s"), (None, "under 10000 bytes/s")])
def test_a_trickling_server_is_cut_off(server, tmp_path, online, deadline, match):
    # each byte arrives well within the per-read timeout, so only a total limit stops it
    start = time.monotonic()
    with pytest.raises(dl.DownloadError, match=match):
        dl.download(f"{server}/trickle.bin", tmp_path / "file.bin", timeout=0.3, deadline=deadline, progress=False)
    assert time.monotonic() - start < 5, "cut off near the deadline (default: 10 x timeout), not after 15 s"
    assert _only(tmp_path) == []


def test_offline_mode_and_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("UTILS_CV_OFFLINE", "1")
    with pytest.raises(dl.DownloadError, match="Offline"):
        dl.download("https://example.org/x.zip", tmp_path)
    with pytest.raises(ValueError, match="'url'"):
        dl.download("file:///etc/passwd", tmp_path)
    with pytest.raises(ValueError, match="'sha256'"):
        dl.download("https://example.org/x.zip", tmp_path, sha256="abc")
    with pytest.raises(ValueError, match="'timeout'"):
        dl.download("https://example.org/x.zip", tmp_path, timeout=0)
    with pytest.raises(ValueError, match="'deadline'"):
        dl.download("https://example.org/x.zip", tmp_path, deadline=-1)


def test_one_sha256_helper(tmp_path):
    from utils_cv.common import paths

    (tmp_path / "f").write_bytes(PAYLOAD)
    assert dl.sha256sum is paths.sha256sum
    assert paths.sha256sum(tmp_path / "f", chunk_size=4096) == hashlib.sha256(PAYLOAD).hexdigest()


# ---------------------------------------------------------------------------- archives
def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                name, data = m
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_good_archives_extract(tmp_path):
    z = _zip(tmp_path / "good.zip", [("imgs/a/1.txt", b"one"), ("imgs/b/2.txt", b"two"), ("imgs/c/", b"")])
    dir_member = tarfile.TarInfo("set/sub")
    dir_member.type = tarfile.DIRTYPE
    t = _tar(tmp_path / "good.tar.gz", [("./set/x.txt", b"x"), dir_member, ("set/sub/y.txt", b"y")])
    dl.extract(z, tmp_path / "out")
    dl.extract(t, tmp_path / "out")
    assert (tmp_path / "out/imgs/b/2.txt").read_bytes() == b"two"
    assert (tmp_path / "out/imgs/c").is_dir()
    assert (tmp_path / "out/set/sub/y.txt").read_text() == "y"
    assert _only(tmp_path / "out") == ["imgs", "set"]
    with pytest.raises(FileExistsError, match="imgs"):
        dl.extract(z, tmp_path / "out")


@pytest.mark.parametrize("members", [
    [("ok.txt", b"fine"), ("../evil.txt", b"x")],
    [("ok.txt", b"fine"), ("/tmp/evil.txt", b"x")],
    [("ok.txt", b"fine"), ("a/../../evil.txt", b"x")],
])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, members, kind):
    archive = (_zip if kind == "zip" else _tar)(tmp_path / f"bad.{'zip' if kind == 'zip' else 'tar.gz'}", members)
    target = tmp_path / "deep" / "out"
    with pytest.raises(dl.UnsafeArchiveError, match="evil.txt"):
        dl.extract(archive, target)
    assert _only(target) == [] and not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep/evil.txt").exists()
    assert _only(tmp_path / "deep") == ["out"], "no temporary folder left behind"


@pytest.mark.parametrize("link", [_link("pics/escape", "../../etc"), _link("pics/abs", "/etc/passwd"),
                                  _link("pics/hard", "../outside.txt", tarfile.LNKTYPE),
                                  _link("pics/inside", "a.txt"), _link("pics/hard_in", "pics/a.txt", tarfile.LNKTYPE),
                                  _link("pics/dev", "", tarfile.CHRTYPE), _link("pics/fifo", "", tarfile.FIFOTYPE)])
def test_links_devices_and_fifos_are_refused(tmp_path, link):
    archive = _tar(tmp_path / "links.tar.gz", [("pics/a.txt", b"a"), link])
    with pytest.raises(dl.UnsafeArchiveError, match=link.name + ".*" + ("link" if link.linkname else "not a file")):
        dl.extract(archive, tmp_path / "out")
    assert _only(tmp_path / "out") == []
    assert _only(tmp_path) == ["links.tar.gz", "out"]


def _zip_link(zf, name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores it
    zf.writestr(info, target)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_chained_links_cannot_climb_out(tmp_path, kind):
    # s -> . and t -> s/.. each stay inside when read alone; together t is the parent folder
    if kind == "zip":
        archive = tmp_path / "chain.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            _zip_link(zf, "s", ".")
            _zip_link(zf, "t", "s/..")
            zf.writestr("t/pwned.txt", b"pwned")
    else:
        archive = _tar(tmp_path / "chain.tar.gz", [_link("s", "."), _link("t", "s/.."), ("t/pwned.txt", b"pwned")])
    with pytest.raises(dl.UnsafeArchiveError, match="'s' is a link") as err:
        dl.extract(archive, tmp_path / "deep" / "out")
    assert "damaged" not in str(err.value) and "corrupt" not in str(err.value)
    assert not list(tmp_path.rglob("pwned.txt"))
    assert _only(tmp_path / "deep") == ["out"] and _only(tmp_path / "deep" / "out") == []


def _cve_2025_4517_tar(path):
    """The published long-path symlink chain: os.path.realpath gives up past PATH_MAX and
    checks the rest of the path lexically while the kernel follows the links, so tarfile's
    filter="data" lets 'escape' (a link to the parent of the target) through."""
    comp, steps, parent = "d" * 247, "abcdefghijklmnop", ""
    members = []
    for step in steps:
        folder = tarfile.TarInfo(os.path.join(parent, comp))
        folder.type = tarfile.DIRTYPE
        members += [folder, _link(os.path.join(parent, step), comp)]
        parent = os.path.join(parent, comp)
    long_link = os.path.join(*steps, "l" * 254)
    members += [_link(long_link, "../" * len(steps)), _link("escape", long_link + "/.."), ("escape/pwned.txt", b"x")]
    return _tar(path, members)


def test_cve_2025_4517_long_path_symlinks_are_refused(tmp_path):
    archive = _cve_2025_4517_tar(tmp_path / "cve.tar.gz")
    (tmp_path / "pwned.txt").write_text("mine")
    with pytest.raises(dl.UnsafeArchiveError, match="is a link"):
        dl.extract(archive, tmp_path / "out")
    assert (tmp_path / "pwned.txt").read_text() == "mine", "the file beside the target is untouched"
    assert _only(tmp_path) == ["cve.tar.gz", "out", "pwned.txt"] and _only(tmp_path / "out") == []


def _zip_stream(path, name, size, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf, zf.open(name, "w", force_zip64=True) as f:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    return path


def test_archives_beyond_the_limits_are_refused(tmp_path):
    small = _zip_stream(tmp_path / "small.zip", "zeros.bin", 2 << 20)
    with pytest.raises(dl.UnsafeArchiveError, match="max_size=1000000"):
        dl.extract(small, tmp_path / "out", max_size=1_000_000)
    assert _only(tmp_path / "out") == []
    dl.extract(small, tmp_path / "out")  # under the default limits
    assert (tmp_path / "out/zeros.bin").stat().st_size == 2 << 20
    bomb = _zip_stream(tmp_path / "bomb.zip", "zeros.bin", 80 << 20)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(dl.UnsafeArchiveError, match="compression bomb"):
        dl.extract(bomb, tmp_path / "out2")
    assert _only(tmp_path / "out2") == []
    many = _zip(tmp_path / "many.zip", [(f"f{i}.txt", b"") for i in range(20)])
    with pytest.raises(dl.UnsafeArchiveError, match="max_members=10"):
        dl.extract(many, tmp_path / "out3", max_members=10)
    with pytest.raises(ValueError, match="'max_size'"):
        dl.extract(many, tmp_path / "out3", max_size=0)


def test_zip_fifo_and_duplicate_members_are_refused(tmp_path):
    fifo = tmp_path / "fifo.zip"
    with zipfile.ZipFile(fifo, "w") as zf:
        info = zipfile.ZipInfo("pipe")
        info.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(info, b"")
    with pytest.raises(dl.UnsafeArchiveError, match="'pipe' is a device, FIFO"):
        dl.extract(fifo, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it writes
        dup = _zip(tmp_path / "dup.zip", [("a.txt", b"first"), ("a.txt", b"second")])
    with pytest.raises(dl.UnsafeArchiveError, match="more than once"):
        dl.extract(dup, tmp_path / "out")
    clash = _zip(tmp_path / "clash.zip", [("a", b"file"), ("a/b.txt", b"under a file")])
    with pytest.raises(dl.UnsafeArchiveError, match="both a file and a folder"):
        dl.extract(clash, tmp_path / "out")
    assert _only(tmp_path / "out") == []


def test_zip_symlink_out_of_the_folder_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        _zip_link(zf, "data/escape", "../../../etc/passwd")
    with pytest.raises(dl.UnsafeArchiveError, match="escape"):
        dl.extract(path, tmp_path / "out")


def test_not_an_archive_and_damaged_archives(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        dl.extract(tmp_path / "notes.txt", tmp_path / "out")
    blob = _zip(tmp_path / "good.zip", [("a.txt", b"a" * 1000)]).read_bytes()
    (tmp_path / "cut.zip").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError):
        dl.extract(tmp_path / "cut.zip", tmp_path / "out2")
    tar_blob = _tar(tmp_path / "good.tar.gz", [("a.txt", os.urandom(5000))]).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(tar_blob[: len(tar_blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        dl.extract(tmp_path / "cut.tar.gz", tmp_path / "out4")
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        dl.extract(tmp_path / "nope.zip", tmp_path / "out3")
