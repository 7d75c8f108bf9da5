"""``cpt runs``: the runs under a directory as a lineage tree (which run branched from which checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from cpt.checkpoint import list_checkpoints


def find_runs(root: Path) -> dict[Path, dict]:
    """Run directories below ``root`` (those holding a ``run.json``), with their run info."""
    runs = {}
    for info_path in sorted(root.glob("**/run.json")):
        if "checkpoints" in info_path.parts:
            continue
        try:
            runs[info_path.parent.resolve()] = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
    return runs


def _describe(run_dir: Path, info: dict) -> str:
    checkpoints = list_checkpoints(run_dir)
    last = f"last checkpoint {checkpoints[-1][1].relative_to(run_dir)}" if checkpoints else "no checkpoint"
    lineage = info.get("lineage")
    origin = f" <- {lineage['checkpoint']} (stage {lineage['stage']}, step {lineage['step']})" if lineage else ""
    return f"{run_dir.name}  [{last}]{origin}"


def format_runs(root: Path) -> str:
    """A text tree: runs without a parent (below ``root``) at the top, branches indented beneath their parent."""
    runs = find_runs(root)
    if not runs:
        return f"no runs under {root}"
    children: dict[Path | None, list[Path]] = {}
    for run_dir, info in runs.items():
        lineage = info.get("lineage")
        parent = Path(lineage["parent_run"]).resolve() if lineage else None
        children.setdefault(parent if parent in runs else None, []).append(run_dir)
    lines = []

    def walk(run_dir: Path, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        lines.append(prefix + branch + _describe(run_dir, runs[run_dir]))
        kids = children.get(run_dir, [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("    " if last else "│   ")), i == len(kids) - 1, False)

    for run_dir in children.get(None, []):
        walk(run_dir, "", True, True)
    return "\n".join(lines)
