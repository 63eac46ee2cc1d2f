"""Atomic writes: bytes, text and writer functions land whole; a writer that fails leaves the old
file (or none) and no temporary file; JSON as json.dumps writes it; permissions follow the umask."""

from __future__ import annotations

import json
import os
import stat

import pytest

from actedit.interventions.files import TEMP_SUFFIX, current_umask, write_atomic, write_json


class WriterFailed(Exception):
    pass


@pytest.fixture
def umask():
    """A function that sets the process umask (``umask(0o077)``); the old one is restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_bytes_text_and_a_writer_function_land_whole(tmp_path):
    target = tmp_path / "new" / "folder" / "data.bin"  # missing folders are created
    payload = bytes(range(256)) * 4
    assert write_atomic(target, payload) == target
    assert target.read_bytes() == payload
    text = "température ✓ 温度\nsecond line"
    assert write_atomic(str(tmp_path / "text.txt"), text) == tmp_path / "text.txt"  # a str path is accepted
    assert (tmp_path / "text.txt").read_bytes() == text.encode("utf-8")
    chunks = [b"first,", b"second,", b"third"]

    def writer(handle):
        for chunk in chunks:
            handle.write(chunk)

    write_atomic(tmp_path / "chunks.bin", writer)
    assert (tmp_path / "chunks.bin").read_bytes() == b"".join(chunks)
    assert listing(tmp_path) == ["chunks.bin", "new", "text.txt"]  # no temporary file left


def test_an_existing_file_is_replaced(tmp_path):
    target = tmp_path / "state.txt"
    target.write_text("old contents that are longer than the new ones")
    write_atomic(target, "new")
    assert target.read_text() == "new" and listing(tmp_path) == ["state.txt"]


@pytest.mark.parametrize("error", [WriterFailed("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path, error):
    target = tmp_path / "manifest.json"
    target.write_text('{"shards": 2}')
    seen = []

    def failing(handle):
        handle.write(b'{"shards": 3, "trunc')
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX))
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, failing)
    assert len(seen) == 1 and seen[0].startswith(".manifest.json.")  # it wrote beside the target ...
    assert target.read_text() == '{"shards": 2}'  # ... and the target is untouched
    assert listing(tmp_path) == ["manifest.json"]  # ... and the temporary file is gone


def test_a_failing_writer_creates_no_file(tmp_path):
    def failing(handle):
        raise WriterFailed("before any byte")

    with pytest.raises(WriterFailed):
        write_atomic(tmp_path / "never.json", failing)
    assert listing(tmp_path) == []


def test_write_json_equals_json_dumps_with_a_newline(tmp_path):
    value = {"b": [1, 2.5, None], "a": {"ünïcode": "✓"}, "c": True}
    path = write_json(tmp_path / "value.json", value)
    assert path == tmp_path / "value.json"
    assert path.read_text(encoding="utf-8") == json.dumps(value, indent=1) + "\n"
    assert json.loads(path.read_text(encoding="utf-8")) == value
    write_json(path, value, indent=None, sort_keys=True)  # json.dumps arguments pass through
    assert path.read_text(encoding="utf-8") == json.dumps(value, sort_keys=True) + "\n"
    with pytest.raises(TypeError):
        write_json(path, {"not serialisable": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == value  # the failed write changed nothing
    assert listing(tmp_path) == ["value.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask and current_umask() == mask  # reading it leaves it as it was
    path = write_atomic(tmp_path / "artifact.bin", b"x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    # the same mode as a file open() creates under this umask
    reference = tmp_path / "plain.bin"
    reference.write_bytes(b"x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
