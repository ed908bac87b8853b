"""Tests of jaxres.data.download and of the 'cifar10' fallback to the official archive, each against
an HTTP server on 127.0.0.1 run by the test (nothing leaves the machine)."""

from __future__ import annotations

import hashlib
import http.server
import threading

import numpy as np
import pytest

from jaxres import data
from jaxres.data import load_dataset, sources
from jaxres.data.download import download_file
from jaxres.errors import JaxresError
from tests.helpers import check_official_dataset, files_under, official_batches, write_official_tar


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves `body` at every path; counts requests. mode: 'good'; 'drop' (announces the full
    Content-Length, sends half the bytes, closes); 'drop-chunked' (the same in chunked transfer
    encoding, without Content-Length); 'missing' (404)."""

    daemon_threads = True

    def __init__(self, body: bytes):
        super().__init__(("127.0.0.1", 0), ArchiveRequestHandler)
        self.body, self.mode, self.requests = body, "good", 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/cifar-10-python.tar.gz"


class ArchiveRequestHandler(http.server.BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self):
        server = self.server
        server.requests += 1
        if server.mode == "missing":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        if server.mode == "drop-chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = server.body[: len(server.body) // 2]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))  # then closes without the last chunk
            return
        self.send_header("Content-Length", str(len(server.body)))
        self.end_headers()
        self.wfile.write(server.body[: len(server.body) // 2] if server.mode == "drop" else server.body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def batches():
    return official_batches()


@pytest.fixture
def archive_bytes(tmp_path, batches) -> bytes:
    """A small cifar-10-python.tar.gz in the official layout (see tests.helpers)."""
    (tmp_path / "served").mkdir()
    return write_official_tar(tmp_path / "served" / "cifar-10-python.tar.gz", batches).read_bytes()


@pytest.fixture
def server(archive_bytes):
    """An ArchiveServer of `archive_bytes` on 127.0.0.1, in a thread; shut down afterwards."""
    server = ArchiveServer(archive_bytes)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def cifar10_from_server(server, archive_bytes, tmp_path, monkeypatch):
    """'cifar10' with TFDS unprepared and no TensorFlow, the fallback pointed at `server` and
    expecting the MD5 of the archive it serves. Returns the cache folder to load with."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(sources, "_tensorflow_installed", lambda: False)
    monkeypatch.setenv(data.CIFAR10_URL_VARIABLE, server.url)
    monkeypatch.setattr(sources, "CIFAR10_ARCHIVE_MD5", hashlib.md5(archive_bytes).hexdigest())
    return tmp_path / "cache"


def test_cifar10_downloads_verifies_and_decodes_once(cifar10_from_server, server, archive_bytes, batches):
    cache_dir = cifar10_from_server
    dataset = load_dataset("cifar10", cache_dir=cache_dir, progress=False)
    check_official_dataset(dataset, batches)
    assert dataset.train.images.shape == (22, 32, 32, 3) and dataset.test.images.shape == (5, 32, 32, 3)
    assert dataset.source == f"official CIFAR-10 python archive {cache_dir / 'downloads' / 'cifar-10-python.tar.gz'}"
    assert server.requests == 1
    assert (cache_dir / "downloads" / "cifar-10-python.tar.gz").read_bytes() == archive_bytes
    cached = [name for name in files_under(cache_dir) if name != "downloads/cifar-10-python.tar.gz"]
    assert len(cached) == 1 and cached[0].startswith("tar-cifar-10-python.tar.gz-") and cached[0].endswith(".npz")
    again = load_dataset("cifar10", cache_dir=cache_dir, progress=False)
    check_official_dataset(again, batches)
    assert server.requests == 1  # the verified archive (and its decoded arrays) came from the cache


def test_corrupt_download_leaves_nothing(cifar10_from_server, server, archive_bytes):
    cache_dir = cifar10_from_server
    server.body = archive_bytes[:100] + bytes([archive_bytes[100] ^ 0xFF]) + archive_bytes[101:]
    expected, actual = sources.CIFAR10_ARCHIVE_MD5, hashlib.md5(server.body).hexdigest()
    with pytest.raises(JaxresError) as error:
        load_dataset("cifar10", cache_dir=cache_dir, progress=False)
    message = str(error.value)
    assert f"download of {server.url} is corrupt: MD5 checksum mismatch, expected {expected}, got {actual}" in message
    assert "pip install tensorflow" in message  # the TFDS way is named too
    assert files_under(cache_dir) == []


@pytest.mark.parametrize("mode", ["drop", "drop-chunked"])
def test_dropped_connection_then_clean_rerun(cifar10_from_server, server, archive_bytes, batches, mode):
    cache_dir = cifar10_from_server
    server.mode = mode
    with pytest.raises(JaxresError) as error:
        load_dataset("cifar10", cache_dir=cache_dir, progress=False)
    half, total = len(archive_bytes) // 2, len(archive_bytes)
    if mode == "drop":  # http.client returns the short body quietly; download_file counts
        failure = f"failed: the connection closed after {half} of {total} bytes"
    else:  # http.client raises IncompleteRead
        failure = f"failed after {half} bytes: IncompleteRead: IncompleteRead({half} bytes read)"
    assert f"download of {server.url} {failure}; nothing was kept, run again to retry" in str(error.value)
    assert files_under(cache_dir) == []
    server.mode = "good"
    check_official_dataset(load_dataset("cifar10", cache_dir=cache_dir, progress=False), batches)
    assert server.requests == 2


def test_download_file_http_error(server, tmp_path):
    server.mode = "missing"
    with pytest.raises(JaxresError, match=rf"download of {server.url} failed: HTTP 404 Not Found"):
        download_file(server.url, tmp_path / "out" / "file.tar.gz", "0" * 32)
    assert files_under(tmp_path / "out") == []


def test_download_file_replaces_atomically_and_shows_progress(server, archive_bytes, tmp_path, capsys):
    destination = tmp_path / "out" / "file.tar.gz"
    destination.parent.mkdir()
    destination.write_bytes(b"an older copy")
    md5 = hashlib.md5(archive_bytes).hexdigest().upper()  # either case is accepted
    assert download_file(server.url, destination, md5, progress=True) == destination
    assert destination.read_bytes() == archive_bytes and files_under(tmp_path / "out") == ["file.tar.gz"]
    assert "downloading file.tar.gz" in capsys.readouterr().err


def test_prepared_tfds_copy_comes_first(cifar10_from_server, server, tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    prepared = tmp_path / "tfds" / "cifar10" / "3.0.2"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    image = np.zeros((32, 32, 3), np.uint8)
    records = {split: [{"image": image, "label": 7}] for split in ("train", "test")}
    monkeypatch.setattr(tfds, "data_source", lambda name, *, download, **kwargs: records)
    dataset = load_dataset("cifar10", cache_dir=cifar10_from_server, progress=False)
    assert dataset.source.startswith("tensorflow-datasets cifar10") and dataset.class_names == data.CIFAR10_CLASSES
    assert server.requests == 0 and files_under(cifar10_from_server / "downloads") == []
