"""The run directory: where a run's artifacts, checkpoints, manifest and report live.

Layout::

    runs/<name>/<timestamp>/
      recipe.yaml          the resolved recipe (after --set overrides)
      manifest.json        recipe hash, seed, versions, machine, each stage's status and artifact hashes,
                           ledger rows and report data keyed by stage position ("3-distill")
      run.lock             held while a process works here
      teacher/ student/    model checkpoints (portable format)
      stages/<i>-<key>/    each recipe stage entry's working files (training checkpoints, metrics.csv),
                           by its position: prune, distill, prune, distill work in 0-prune/ 1-distill/
                           2-prune/ 3-distill/ (``RunContext.stage_dir``), never in one another's
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


@dataclass
class RunDir:
    path: Path

    @classmethod
    def choose(cls, name: str, out: Path | None, resume: bool, runs_root: Path = Path("runs")) -> RunDir:
        """``--out`` wins; otherwise a new timestamped folder, or with ``--resume`` the newest one."""
        if out is not None:
            out = Path(out)
            if resume and not (out / "manifest.json").is_file():
                raise ConfigError(f"--resume: {out} holds no manifest.json, so there is no run to resume")
            if not resume and (out / "manifest.json").is_file():
                raise ConfigError(f"--out {out} holds a run already (manifest.json); its files would be replaced",
                                  hint="pass --resume to continue that run, or choose a new --out")
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
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.manifest_path} is damaged and cannot be resumed: {exc}",
                              hint="start a new run (without --resume, or with another --out)") from exc
        if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA or "stages" not in manifest:
            raise ConfigError(f"{self.manifest_path} is not an edgekd manifest ({MANIFEST_SCHEMA})",
                              hint="start a new run (without --resume, or with another --out)")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def rel(self, p: Path) -> str:
        p = Path(p)
        return str(p.relative_to(self.path)) if p.is_relative_to(self.path) else str(p)

    @contextmanager
    def lock(self):
        """Hold the run directory for this process; a second process gets ``RunLockedError``.

        The lock is an OS advisory lock (``fcntl.flock``) on ``run.lock``: taking it is atomic, and
        the kernel releases it when the process dies, so a killed run leaves no lock that needs
        guessing about (the pid written inside is only for the message). After locking we check
        that ``run.lock`` is still the file we locked: a process that opened it just before the
        holder removed it would otherwise hold a lock on a deleted file while a third one locks a
        new file.
        """
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, a path below a file, a read-only or virtual file system
            raise ConfigError(f"cannot make the run directory {self.path}: {exc.strerror or exc}",
                              hint="give --out a folder path that can be created (not an existing file)") from exc
        lock = self.path / "run.lock"
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunLockedError(f"run directory {self.path} is in use by process {holder}",
                                     hint="wait for it to finish, or use another --out") from None
            try:
                same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder removed it between our open and our lock: try again
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield self
        finally:
            lock.unlink(missing_ok=True)  # while still holding the lock (see the docstring)
            os.close(fd)
