"""Artifacts from the Hugging Face Hub, end to end: a fresh process whose ``HF_ENDPOINT`` points at
a local stand-in for the Hub's HTTP API (:class:`FakeHub`, served from a thread of the test
process) downloads the repo ``someone/edit`` with the real ``huggingface_hub`` client, and
``load_artifact`` (and stock ``pyvene.IntervenableModel.load``) reproduce the edited logits bit
for bit; a missing repo and a download corrupted in transit give actedit's errors."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterable, List, Tuple
from urllib.parse import unquote, urlsplit

import pytest
import torch

import actedit.interventions as ai
from actedit.interventions import save_artifact
from conftest import STOCK_RELOAD_INPUTS as INPUTS
from conftest import run_fresh_python, tiny_model

REPO = "someone/edit"
COMMIT = "5e1f0d4c3b2a19887766554433221100ffeeddcc"  # the fake commit the repo's main branch points at

API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's bytes (what the Hub reports as a regular file's ``oid``/``ETag``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the :class:`FakeHub` its server belongs to."""

    def do_GET(self) -> None:
        self.server.hub.answer(self, with_body=True)

    def do_HEAD(self) -> None:
        self.server.hub.answer(self, with_body=False)

    def log_message(self, *args) -> None:
        """Keep the test output quiet."""


class FakeHub:
    """A stand-in for the Hugging Face Hub's HTTP API that serves one model repo, :data:`REPO`, whose
    ``main`` is the commit :data:`COMMIT`. It answers the requests that ``snapshot_download`` of
    huggingface_hub 2.4.0 makes (HTTP/1.0, one thread per request, on 127.0.0.1):

    - ``GET /api/models/<repo>/revision/<rev>``: the model info (``id``, ``sha``, ``siblings``);
    - ``GET /api/models/<repo>/tree/<rev>?recursive=...``: the file listing, one page (no ``Link``);
    - ``HEAD``/``GET /<repo>/resolve/<rev>/<file>``: a regular file with ``X-Repo-Commit``, its git
      blob id as ``ETag`` and ``Content-Length``; an LFS file (``*.bin``, as the repo's
      ``.gitattributes`` says) as the Hub sends one: a 302 to another host (here a second server on
      another port, the "CDN") with ``X-Linked-Etag`` (its SHA-256) and ``X-Linked-Size``;
    - on the CDN, ``GET /<sha256>``: the LFS file's bytes.

    Anything else is a 404 with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
    ``EntryNotFound``), which huggingface_hub turns into its typed errors. ``corrupt`` names files
    whose served bytes have one bit flipped (same size). ``requests`` records ``(server, method,
    unquoted path)`` of every request; ``served`` the names of the files whose bytes went out.
    """

    def __init__(self, files: Dict[str, bytes], corrupt: Iterable[str] = ()) -> None:
        self.files = files
        self.corrupt = set(corrupt)
        self.requests: List[Tuple[str, str, str]] = []
        self.served: List[str] = []
        self.lfs = {hashlib.sha256(data).hexdigest(): name for name, data in files.items() if name.endswith(".bin")}
        self.servers = {"hub": ThreadingHTTPServer(("127.0.0.1", 0), _Handler)}
        self.servers["cdn"] = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        for server in self.servers.values():
            server.hub = self
            server.daemon_threads = True
        self.endpoint = self.url("hub")

    def url(self, name: str) -> str:
        return "http://127.0.0.1:%d" % self.servers[name].server_address[1]

    def __enter__(self) -> FakeHub:
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()

    def answer(self, request: BaseHTTPRequestHandler, with_body: bool) -> None:
        """Route one request (see the class docstring)."""
        path = urlsplit(request.path).path
        where = "cdn" if request.server is self.servers["cdn"] else "hub"
        self.requests.append((where, request.command, unquote(path)))
        if where == "cdn":
            name = self.lfs.get(path.lstrip("/"))
            if name is None:
                return self.error(request, 404, "EntryNotFound", with_body)
            return self.send_file(request, name, with_body)
        match = API.fullmatch(path) or RESOLVE.fullmatch(path)
        if match is None or unquote(match["repo"]) != REPO:
            return self.error(request, 404, "RepoNotFound", with_body)
        if unquote(match["rev"]) not in ("main", COMMIT):
            return self.error(request, 404, "RevisionNotFound", with_body)
        if match.re is API and match["kind"] == "revision":
            siblings = [{"rfilename": name} for name in sorted(self.files)]
            info = {"id": REPO, "sha": COMMIT, "private": False, "siblings": siblings}
            return self.send_json(request, info, with_body)
        if match.re is API:
            return self.send_json(request, [self.tree_entry(name) for name in sorted(self.files)], with_body)
        name = unquote(match["file"])
        if name not in self.files:
            return self.error(request, 404, "EntryNotFound", with_body)
        if name.endswith(".bin"):
            sha256 = hashlib.sha256(self.files[name]).hexdigest()
            headers = {
                "Location": f"{self.url('cdn')}/{sha256}",
                "ETag": '"%s"' % git_blob_id(self.lfs_pointer(name)),
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(self.files[name])),
                "X-Repo-Commit": COMMIT,
            }
            return self.send(request, 302, headers, b"", with_body)
        return self.send_file(request, name, with_body)

    def lfs_pointer(self, name: str) -> bytes:
        """The git-lfs pointer file that git stores for an LFS file."""
        data = self.files[name]
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            hashlib.sha256(data).hexdigest().encode(),
            len(data),
        )

    def tree_entry(self, name: str) -> dict:
        """One file of the ``/tree`` listing, as the Hub writes it."""
        data = self.files[name]
        if not name.endswith(".bin"):
            return {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
        pointer = self.lfs_pointer(name)
        lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
        return {"type": "file", "oid": git_blob_id(pointer), "size": len(data), "path": name, "lfs": lfs}

    def send_file(self, request: BaseHTTPRequestHandler, name: str, with_body: bool) -> None:
        data = self.files[name]
        if name in self.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
        headers = {"Content-Type": "application/octet-stream"}
        if request.server is self.servers["hub"]:
            headers.update({"ETag": '"%s"' % git_blob_id(self.files[name]), "X-Repo-Commit": COMMIT})
        if with_body:
            self.served.append(name)
        self.send(request, 200, headers, data, with_body)

    def send_json(self, request: BaseHTTPRequestHandler, payload, with_body: bool) -> None:
        self.send(request, 200, {"Content-Type": "application/json"}, json.dumps(payload).encode(), with_body)

    def error(self, request: BaseHTTPRequestHandler, status: int, code: str, with_body: bool) -> None:
        message = {"RepoNotFound": "Repository not found", "RevisionNotFound": "Invalid rev id: not found"}
        text = message.get(code, "Entry not found")
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": text}
        if code == "EntryNotFound":
            headers["X-Repo-Commit"] = COMMIT
        self.send(request, status, headers, json.dumps({"error": text}).encode(), with_body)

    @staticmethod
    def send(request: BaseHTTPRequestHandler, status: int, headers: Dict[str, str], body: bytes, with_body: bool):
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if with_body:
            request.wfile.write(body)


# A fresh process: load the base model from disk, the artifact from the (fake) Hub, print the logits.
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
root, repo, loader, inputs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(root + "/model").float().eval()
try:
    if loader == "pyvene":
        import pyvene as pv
        pvm = pv.IntervenableModel.load(repo, model)
    else:
        from actedit.interventions import load_artifact
        pvm = load_artifact(repo, model)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    raise SystemExit(0)
with torch.no_grad():
    _, out = pvm({k: torch.tensor(v) for k, v in inputs.items()}, unit_locations=None)
print(json.dumps({"logits": out.logits.tolist()}))
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny llama saved to ``root/model``, a CAA + HPR edit of it saved as an artifact, the files
    of the Hub repo that holds the artifact (plus the Hub's ``.gitattributes``), and the edited logits."""
    root = tmp_path_factory.mktemp("hub_download")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(7)
    caa = ai.build_caa_config(model, {1: torch.randn(32, generator=g)}, multiplier=4.0)
    hpr = ai.build_hpr_config(model, [2])
    torch.nn.init.normal_(hpr.representations[0].intervention.probe.weight, std=1.0, generator=g)
    pvm = ai.intervenable(model, ai.compose(caa, hpr))
    with torch.no_grad():
        base = model(**INPUTS).logits
        _, out = pvm(dict(INPUTS), unit_locations=None)
    assert not torch.allclose(out.logits, base), "the edit changes nothing"
    artifact = save_artifact(pvm, root / "artifact")
    files = {path.name: path.read_bytes() for path in artifact.iterdir()}
    assert len([name for name in files if name.startswith("intkey_")]) == 2
    files[".gitattributes"] = b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    return root, files, out.logits


def load_over_http(hub: FakeHub, root: Path, repo: str, loader: str, home: Path, monkeypatch) -> dict:
    """Run :data:`CHILD` in a fresh process that reaches the Hub at ``hub`` with cache ``home``."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    cwd = home / "cwd"  # empty, so that the repo id is no local path
    cwd.mkdir(parents=True)
    inputs = json.dumps({k: v.tolist() for k, v in INPUTS.items()})
    return run_fresh_python(CHILD, str(root), repo, loader, inputs, cwd=cwd)


def test_load_artifact_downloads_from_the_hub(published, tmp_path, monkeypatch):
    """``load_artifact("someone/edit", model)`` downloads every file over HTTP (the ``.bin`` files
    through the CDN redirect) and reproduces the edited logits bit for bit; so does stock pyvene."""
    root, files, logits = published
    with FakeHub(files) as hub:
        result = load_over_http(hub, root, REPO, "actedit", tmp_path / "hf", monkeypatch)
        assert "error" not in result, result
        assert torch.equal(torch.tensor(result["logits"]), logits)
        assert sorted(hub.served) == sorted(files)
        assert ("hub", "GET", f"/api/models/{REPO}/revision/main") in hub.requests
        for name in files:
            assert ("hub", "HEAD", f"/{REPO}/resolve/{COMMIT}/{name}") in hub.requests
        cdn = [path for where, method, path in hub.requests if where == "cdn" and method == "GET"]
        assert sorted(cdn) == sorted(f"/{sha}" for sha in hub.lfs)
        assert {hub.lfs[path[1:]] for path in cdn} == {name for name in files if name.startswith("intkey_")}
        snapshot = tmp_path / "hf" / "hub" / "models--someone--edit" / "snapshots" / COMMIT
        assert sorted(path.name for path in snapshot.iterdir()) == sorted(files)

        hub.served.clear()
        result = load_over_http(hub, root, REPO, "pyvene", tmp_path / "hf_stock", monkeypatch)
        assert "error" not in result, result
        assert torch.equal(torch.tensor(result["logits"]), logits)
        assert sorted(hub.served) == sorted(files)


def test_missing_repo_names_the_repo(published, tmp_path, monkeypatch):
    """A repo the Hub does not have: actedit's FileNotFoundError names the repo id and the fix."""
    root, files, _ = published
    with FakeHub(files) as hub:
        result = load_over_http(hub, root, "someone/missing", "actedit", tmp_path / "hf", monkeypatch)
    assert result["error"] == "FileNotFoundError", result
    message = result["message"]
    assert message.startswith(
        "'someone/missing' is not a local directory and could not be downloaded from the Hugging Face Hub "
        "(RepositoryNotFoundError: 404 Client Error."
    ), message
    assert message.endswith("Check the repo id, your network and HF_TOKEN."), message
    assert ("hub", "GET", "/api/models/someone/missing/revision/main") in hub.requests
    assert hub.served == []


def test_download_corrupted_in_transit_is_refused(published, tmp_path, monkeypatch):
    """One flipped bit in a downloaded ``.bin`` (same size, so huggingface_hub accepts it): the
    manifest's SHA-256 check refuses the artifact."""
    root, files, _ = published
    binary = sorted(name for name in files if name.startswith("intkey_"))[0]
    with FakeHub(files, corrupt=[binary]) as hub:
        result = load_over_http(hub, root, REPO, "actedit", tmp_path / "hf", monkeypatch)
    assert result["error"] == "ArtifactError", result
    assert f"{binary} in " in result["message"] and "does not match its recorded SHA-256" in result["message"]
    assert binary in hub.served
