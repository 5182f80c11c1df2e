"""The run directory: where a run's artifacts, checkpoints, manifest and report live.

Layout::

    runs/<name>/<timestamp>/
      recipe.yaml          the resolved recipe (after --set overrides)
      manifest.json        recipe hash, seed, versions, machine, each stage's status and artifact hashes
      run.lock             held while a process works here
      teacher/ student/    model checkpoints (portable format)
      stages/<i>-<key>/    each stage's working files (training checkpoints, metrics.csv)
      artifacts/           deployable files (.onnx, .ort, .pte)
      report.json report.md report.html
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgekd.errors import ConfigError, RunLockedError
from edgekd.fileio import atomic_write_json

MANIFEST_SCHEMA = "edgekd.manifest/1"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunDir:
    path: Path

    @classmethod
    def choose(cls, name: str, out: Path | None, resume: bool, runs_root: Path = Path("runs")) -> RunDir:
        """``--out`` wins; otherwise a new timestamped folder, or with ``--resume`` the newest one."""
        if out is not None:
            if resume and not (out / "manifest.json").is_file():
                raise ConfigError(f"--resume: {out} holds no manifest.json, so there is no run to resume")
            return cls(out)
        parent = runs_root / name
        if resume:
            previous = sorted(p for p in parent.glob("*") if (p / "manifest.json").is_file()) if parent.is_dir() else []
            if not previous:
                raise ConfigError(f"--resume: no earlier run of {name!r} under {parent}",
                                  hint="start a run without --resume, or pass --out DIR of the run")
            return cls(previous[-1])
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = parent / stamp, 1
        while path.exists():
            n += 1
            path = parent / f"{stamp}-{n}"
        return cls(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def artifacts(self) -> Path:
        p = self.path / "artifacts"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def rel(self, p: Path) -> str:
        p = Path(p)
        return str(p.relative_to(self.path)) if p.is_relative_to(self.path) else str(p)

    @contextmanager
    def lock(self):
        """Refuse a second process in the same run directory; take over a lock whose owner died."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / "run.lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise RunLockedError(f"run directory {self.path} is in use by process {pid}",
                                         hint="wait for it to finish, or use another --out") from None
                lock.unlink(missing_ok=True)  # stale lock from a killed run
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            break
        try:
            yield self
        finally:
            lock.unlink(missing_ok=True)
