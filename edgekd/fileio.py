"""Atomic file writing: a crash never leaves a half-written artifact under its final name."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# the process umask, read once at import (reading it means setting it, which is not thread-safe)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
#: what ``open(path, "w")`` would have created: mkstemp's files are 0600, which hides shipped
#: artifacts from the other users of a board or server (a web server, a deploy account)
NEW_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    Use it for writers that want a file name (torch.onnx.export, ORT's converter, torch.save).
    The temporary file keeps the target's suffix because some writers dispatch on it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, NEW_FILE_MODE)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def stale_temporaries(folder: Path | str) -> list[Path]:
    """Temporary files that ``atomic_path`` left under ``folder`` (recursively): a process killed
    between creating one and renaming it (SIGKILL, an OOM kill) cannot remove it itself.

    Their names are ``.<stem>.<8 random characters><suffix>`` (``tempfile.mkstemp``); only files of
    that shape are returned, so a user's own dot-files are left alone.
    """
    return [p for p in Path(folder).rglob(".*") if p.is_file() and _TEMP_NAME.fullmatch(p.name)]


#: ``tempfile.mkstemp(prefix=".<stem>.", suffix=<suffix>)``: 8 characters from [a-z0-9_]
_TEMP_NAME = re.compile(r"\.(?P<stem>.+)\.[a-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9_]+)?")


def atomic_write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path | str, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: Path | str, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, target: Path | str) -> None:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
