"""A run directory: what cpt writes in it, who holds it, and what ``--overwrite`` may remove.

``RUN_DIR/`` holds

- ``run.json``: what started the run (recipe path, base directory, lineage). It marks the directory as cpt's:
  ``--overwrite`` clears only a directory that has it, and only the files below;
- ``config.yaml`` (the resolved recipe) and ``metrics.jsonl`` (one row per line);
- ``checkpoints/STAGE/step-N/`` (and ``.step-N-*`` while one is being written);
- ``report/``: the files :func:`cpt.report.write_report` writes (:data:`REPORT_FILES`);
- ``.lock``: held with ``flock`` by the one process that trains in the directory, and naming it (pid, host,
  command). The kernel releases it when that process ends, however it ends (SIGKILL, a lost node), so a lock is
  never stale; under torchrun only rank 0 takes it.

Anything else in the directory (prepared ``data/``, wandb's ``wandb/``, ``slurm/``, a user's own files) is
never removed by cpt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from cpt.errors import CptError, space_for

log = logging.getLogger(__name__)

RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "metrics.tmp")
REPORT_FILES = ("curves.png", "gap.png", "summary.json", "stability.json", "index.html")
OUTPUTS = (*RUN_FILES, "checkpoints", "report")
LOCK = ".lock"
CHECKPOINT_NAME = re.compile(r"step-\d+")
STAGING_NAME = re.compile(r"\.step-\d+-.+")  # mkdtemp's, DeepSpeed's ``-staging``, a replaced one's ``-old-PID``


class RunDirBusy(CptError):
    """Another live process holds the run directory's lock."""


def _main_rank() -> bool:
    """Rank 0 of a torchrun/accelerate launch (they set RANK), or a single process."""
    return os.environ.get("RANK", "0") == "0"


def ensure_dir(run_dir: Path) -> Path:
    """Create ``run_dir`` (and its parents); a path that is a file is a one-line error."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise CptError(f"run.dir '{run_dir}' cannot be a directory: '{path}' is a file; set run.dir to a "
                           "directory path")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock while the block runs; raise :class:`RunDirBusy` naming the holder when
    another process has it. Non-zero ranks of a launch do nothing (rank 0 holds it for the job)."""
    if not _main_rank():
        yield
        return
    ensure_dir(run_dir)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(run_dir / LOCK)
        os.close(fd)
        raise RunDirBusy(f"run directory '{run_dir}' is in use by {holder}; wait for it to end or stop it, or "
                         "use another run.dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(["cpt", *sys.argv[1:]])[:300]}).encode() + b"\n")
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']} (`{info['command']}`, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def read_run_info(run_dir: Path) -> dict | None:
    """``run.json`` as written by cpt, or None when the directory has none (or a file that is not cpt's)."""
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "base_dir" in info else None


def has_progress(run_dir: Path) -> bool:
    """Whether a run got anywhere worth keeping: a checkpoint, or a training row in ``metrics.jsonl``."""
    if any((run_dir / "checkpoints").glob("*/step-*")):
        return True
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    with open(metrics, errors="replace") as f:
        return any('"kind": "train"' in line for line in f)


def claim(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a new run (the caller holds its lock).

    An empty or new directory is used as it is. A cpt run that never trained (no checkpoint, no training row,
    e.g. a start that failed on a missing corpus) is replaced without asking. A run with progress is replaced
    only with ``overwrite``, and then only cpt's own files go (:func:`clear`). A directory with cpt's output
    names but no cpt ``run.json`` is never touched.
    """
    ensure_dir(run_dir)
    present = [name for name in OUTPUTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if not present:
        return
    if read_run_info(run_dir) is None:
        raise CptError(f"'{run_dir}' holds {', '.join(present)} but is not a cpt run (no cpt run.json), and cpt "
                       "deletes only files it wrote: choose another run.dir, or move those files")
    links = [name for name in present if (run_dir / name).is_symlink()]
    if links:
        raise CptError(f"'{run_dir / links[0]}' is a symbolic link, which cpt never writes: remove the link "
                       "yourself, or choose another run.dir")
    if has_progress(run_dir):
        if not overwrite:
            raise CptError(f"run directory '{run_dir}' already holds a run ({', '.join(present)}); pass "
                           "run.dir=NEW_DIR for a new run, or --overwrite to replace it (prepared data is kept)")
        log.warning("--overwrite: removing the run in %s (cpt's files only)", run_dir)
    else:
        log.info("replacing the run in %s: it stopped before its first training step", run_dir)
    clear(run_dir)


def clear(run_dir: Path) -> None:
    """Remove what cpt wrote in ``run_dir`` and nothing else: :data:`RUN_FILES`, the report's files, and
    checkpoint directories (``checkpoints/STAGE/step-N``, ``.step-N-*``). Symbolic links are never followed;
    a folder that still holds other files after that is kept, with a warning."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    _clear_folder(run_dir / "report", lambda p: p.name in REPORT_FILES and p.is_file() and not p.is_symlink())
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for stage in sorted(checkpoints.iterdir()):
            if stage.is_dir() and not stage.is_symlink():
                _clear_folder(stage, lambda p: p.is_dir() and not p.is_symlink() and _is_checkpoint_name(p.name))
        _clear_folder(checkpoints, lambda p: False)


def _is_checkpoint_name(name: str) -> bool:
    return bool(CHECKPOINT_NAME.fullmatch(name) or STAGING_NAME.fullmatch(name))


def _clear_folder(folder: Path, ours) -> None:
    """Remove the entries of ``folder`` that ``ours`` accepts, then the folder when it is left empty."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in sorted(folder.iterdir()):
        if ours(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    left = sorted(p.name for p in folder.iterdir())
    if left:
        log.warning("kept %s: it holds files cpt did not write (%s)", folder, ", ".join(left[:5]))
    else:
        folder.rmdir()


def remove_stale_staging(run_dir: Path) -> None:
    """Remove checkpoint staging directories (``checkpoints/STAGE/.step-N-*``) left by a process killed while it
    wrote a checkpoint. Only call it holding the run's lock: then no live process is writing one."""
    stale = sorted(p for p in (run_dir / "checkpoints").glob("*/.step-*")
                   if p.is_dir() and not p.is_symlink() and STAGING_NAME.fullmatch(p.name))
    for path in stale:
        shutil.rmtree(path)
    if stale:
        log.warning("removed %d unfinished checkpoint write(s) left by a killed run: %s", len(stale),
                    ", ".join(str(p.relative_to(run_dir)) for p in stale))


def keep_rows(path: Path, keep: int) -> None:
    """Keep the first ``keep`` rows of ``metrics.jsonl``: those the checkpoint covers (no duplicates later).
    Rewritten through a temporary file, so a full disk leaves the file as it was."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) < keep:
        log.warning("%s has %d rows but the checkpoint covers %d: rows after %d were lost before this resume",
                    path, len(lines), keep, len(lines))
    tmp = path.with_suffix(".tmp")
    try:
        with space_for(path.parent, "the resumed run's metrics", needed=sum(len(line) for line in lines[:keep])):
            tmp.write_text("".join(lines[:keep]))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
