"""A training run's output folder: who may use it, whether it may be reused, and its metrics.jsonl.

Rules (rank 0 applies them; the other ranks only read the folder's checkpoints):
- A run holds an exclusive lock on DIR/.lock (fcntl.flock) from before its first write to its end. The OS drops
  the lock when the process dies, so a killed run never leaves a stale lock; a second run on the same folder
  refuses at once, naming it.
- A folder that holds a recorded step (a complete checkpoint, or a complete step line in metrics.jsonl) is never
  overwritten: a fresh run refuses and names --resume. A folder with neither (a run that failed before its first
  step, or was killed during it) is reusable, and a fresh run starts it over.
- Without --out a fresh run takes the first of runs/NAME, runs/NAME-2, ... that holds no run and that it can lock,
  so two runs started together never pick the same folder; --resume takes the newest that holds a run.
- metrics.jsonl gets one JSON line per step, flushed as it is written. A crash (or a full disk) can leave the last
  line half-written: a resume drops it, saying so, and drops the lines of steps after the checkpoint it continues
  from (they are about to be redone).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"


class RunDirError(ValueError):
    """The output folder cannot be used for this run (user error: one line, naming the folder)."""


def _complete_checkpoints(out: Path) -> list[Path]:
    from ..parallel.checkpoint import complete_checkpoints  # DCP and friends only when a folder is inspected

    return complete_checkpoints(out)


def read_metrics(path: Path, log=None) -> list[dict]:
    """The complete step records of a metrics.jsonl. A half-written LAST line is dropped (and reported through
    `log`); a broken line before the last is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                if log is not None:
                    log(f"{path}: dropping a half-written last line ({len(ln)} characters): {e}")
                break
            raise RunDirError(f"{path}:{i + 1}: not a step record ({e})") from None
        records.append(rec)
    return records


def holds_run(out: Path) -> bool:
    """Whether `out` holds a recorded step: a complete checkpoint or a complete step line in metrics.jsonl."""
    return out.is_dir() and (bool(_complete_checkpoints(out)) or bool(read_metrics(out / METRICS_FILE)))


class RunDir:
    """An output folder this process holds the lock of (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_fd: int | None = None

    def try_lock(self) -> bool:
        """Take the exclusive lock (creating the folder); False when another live process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def lock(self) -> "RunDir":
        if not self.try_lock():
            raise RunDirError(f"{self.path} is in use by another training run (it holds {self.path / LOCK_FILE}); "
                              "wait for it to finish, or choose another --out")
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def start_fresh(self) -> None:
        """A fresh run in a reusable folder: the metrics of an earlier run that recorded no step are dropped."""
        self.metrics_path.unlink(missing_ok=True)

    def keep_metrics_until(self, step: int, log) -> None:
        """Before a resume from the checkpoint of `step`: rewrite metrics.jsonl with the complete lines of steps
        <= step only (a half-written last line is dropped, saying so)."""
        records = [r for r in read_metrics(self.metrics_path, log) if r["step"] <= step]
        tmp = self.metrics_path.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.metrics_path)


def _nth(name: str, n: int) -> Path:
    return Path("runs") / (name if n == 1 else f"{name}-{n}")


def resume_folder(out: Path | None, name: str) -> Path:
    """The folder a --resume run takes (nothing is locked here): --out as given, else the newest of runs/NAME,
    runs/NAME-2, ... numbered without a gap."""
    if out is not None:
        return out
    n = 1
    while holds_run(_nth(name, n)):
        n += 1
    return _nth(name, max(n - 1, 1))


def claim(out: Path | None, name: str, resume: bool) -> RunDir:
    """The locked RunDir for this run (rank 0): --out as given, else the default runs/NAME[-N] (see the module
    docstring). Raises RunDirError for a folder another run holds, a fresh run on a folder that holds a run, and a
    resume with nothing to resume."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise RunDirError(f"--out {out} is a file, not a folder")
        _check_use(out, resume)  # before the lock creates anything
        run = RunDir(out).lock()
        _check_use(out, resume)  # again under the lock: a run that held it may have just written a step
        return run

    if resume:
        return claim(resume_folder(None, name), name, resume)
    n = 1
    while holds_run(_nth(name, n)):
        n += 1
    while True:
        run = RunDir(_nth(name, n))
        if run.try_lock():
            if not holds_run(run.path):  # re-checked under the lock: another run may have just written there
                return run
            run.release()
        n += 1


def _check_use(out: Path, resume: bool) -> None:
    from ..parallel.checkpoint import CheckpointError

    if resume:
        if not _complete_checkpoints(out):
            found = sorted(p.name for p in out.glob("step_*"))
            raise CheckpointError(f"--resume: no complete checkpoint in {out}"
                              + (f" (incomplete: {', '.join(found)})" if found else "")
                              + "; run without --resume to start it over")
        return
    if holds_run(out):
        ckpts = _complete_checkpoints(out)
        raise RunDirError(f"{out} already holds a run ({ckpts[-1].name if ckpts else METRICS_FILE}): pass --resume "
                          "to continue it, or choose another --out")
