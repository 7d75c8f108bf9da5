"""Writing one benchmark's section into BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INTRO = """# Benchmarks

Measured numbers for `cpt`, each section written by the script it names (rerun the script to refresh it;
do not edit the numbers by hand). Machine, command and library versions are recorded with each table.
"""


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the ``heading`` section of ``path``, keeping every other section."""
    text = path.read_text() if path.exists() else INTRO
    section = f"{heading}\n\n{body}"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


def machine(**versions: str) -> dict[str, str]:
    """CPU count and model and the Python version, plus the library ``versions`` a benchmark depends on."""
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": str(len(os.sched_getaffinity(0))), "cpu": cpu, "python": platform.python_version(), **versions}


def code_version(*paths: str) -> str:
    """The commit, and which of ``paths`` (relative to the repository) had uncommitted changes when measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    changed = [p for p in dirty if p.startswith("cpt/")]
    return f"commit {commit}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")
