"""download / extract against a real HTTP server on localhost and real archives."""
import hashlib
import http.server
import io
import os
import tarfile
import threading
import time
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
    z = _zip(tmp_path / "good.zip", [("imgs/a/1.txt", b"one"), ("imgs/b/2.txt", b"two")])
    t = _tar(tmp_path / "good.tar.gz", [("set/x.txt", b"x"), _link("set/y.txt", "x.txt")])
    dl.extract(z, tmp_path / "out")
    dl.extract(t, tmp_path / "out")
    assert (tmp_path / "out/imgs/b/2.txt").read_bytes() == b"two"
    assert (tmp_path / "out/set/y.txt").read_text() == "x", "a link inside the folder is fine"
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
                                  _link("pics/dev", "", tarfile.CHRTYPE)])
def test_links_out_of_the_folder_and_devices_are_refused(tmp_path, link):
    archive = _tar(tmp_path / "links.tar.gz", [("pics/a.txt", b"a"), link])
    with pytest.raises(dl.UnsafeArchiveError, match=link.name):
        dl.extract(archive, tmp_path / "out")
    assert _only(tmp_path / "out") == []


def test_zip_symlink_out_of_the_folder_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("data/escape")
        info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores it
        zf.writestr(info, "../../../etc/passwd")
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
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        dl.extract(tmp_path / "nope.zip", tmp_path / "out3")
