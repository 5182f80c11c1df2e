"""Atomic writes: a failed writer leaves the old file and no temporary; a new file gets normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from edgekd.fileio import NEW_FILE_MODE, atomic_path, atomic_write_json, atomic_write_text


def test_new_file_gets_umask_permissions_not_mkstemp_0600(tmp_path):
    target = tmp_path / "model.onnx"
    atomic_write_text(target, "x")
    assert stat.S_IMODE(target.stat().st_mode) == NEW_FILE_MODE
    # compare with what a plain open() creates in the same process
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == NEW_FILE_MODE
    assert NEW_FILE_MODE & stat.S_IRUSR and NEW_FILE_MODE & stat.S_IWUSR


def test_failed_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"v": 1})
    before = target.read_text()
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("writer crashed")
    assert target.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_temporary_keeps_the_suffix_writers_dispatch_on(tmp_path):
    with atomic_path(tmp_path / "sub" / "student.pte") as tmp:
        assert tmp.suffix == ".pte" and tmp.parent == tmp_path / "sub"
        tmp.write_bytes(b"pte")
    assert (tmp_path / "sub" / "student.pte").read_bytes() == b"pte"
