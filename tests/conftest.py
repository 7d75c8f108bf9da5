"""Shared tiny fixtures: a few KB of real text (KJV chapters, standard-library code) and a 2-layer recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from cpt.data.sources import CorpusConfig, iter_documents


@pytest.fixture(scope="session")
def tiny_corpora(tmp_path_factory) -> Path:
    """``english.jsonl`` (12 KJV chapters) and ``code/`` (10 short stdlib modules), about 60 KB in all."""
    root = tmp_path_factory.mktemp("corpora")
    chapters = list(iter_documents(CorpusConfig(source="kjv", max_docs=12)))
    with open(root / "english.jsonl", "w") as f:
        for text in chapters:
            f.write(json.dumps({"text": text}) + "\n")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = root / "code"
    code.mkdir()
    names = ["bisect.py", "colorsys.py", "copyreg.py", "fnmatch.py", "genericpath.py", "keyword.py",
             "numbers.py", "reprlib.py", "stat.py", "textwrap.py"]
    for name in names:
        (code / name).write_text((stdlib / name).read_text()[:6000])
    return root


def tiny_recipe(corpora: Path, run_dir: Path, **stage_steps: int) -> dict:
    """A 2-stage recipe (English, then code with 10% replay) for a 2-layer model on the tiny corpora."""
    steps = {"pretrain": 12, "cpt": 12, **stage_steps}
    return {
        "name": "tiny",
        "model": {"init": "scratch", "arch": {"layers": 2, "hidden": 32, "heads": 2}},
        "tokenizer": {"train": {"vocab_size": 512}},
        "corpora": {"english": {"source": str(corpora / "english.jsonl"), "val_fraction": 0.2},
                    "code": {"source": str(corpora / "code"), "val_fraction": 0.2}},
        "eval": {"every": 5, "max_tokens": 1024, "batch_size": 4, "sets": {"upstream": "english", "downstream": "code"}},
        "stages": [
            {"name": "pretrain", "steps": steps["pretrain"], "mixture": {"english": 1.0},
             "schedule": {"peak_lr": 1e-2, "warmup_steps": 2}},
            {"name": "cpt", "steps": steps["cpt"], "mixture": {"code": 0.9, "english": 0.1},
             "schedule": {"peak_lr": 1e-2, "warmup_steps": 2}},
        ],
        "train": {"seq_len": 32, "micro_batch": 4, "grad_accum": 2},
        "run": {"dir": str(run_dir), "seed": 0},
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tiny_corpora, tmp_path) -> Path:
    """The tiny recipe written to ``tmp_path/tiny.yaml`` with its run directory in ``tmp_path/run``."""
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_corpora, tmp_path / "run"))


WALL_CLOCK = ("time", "tokens_per_s", "seconds", "eval_seconds")


def run_cpt(*args: str):
    """``python -m cpt ARGS`` in a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "cpt", *args], capture_output=True, text=True)


def read_rows(run_dir: Path) -> list[dict]:
    """A run's complete ``metrics.jsonl`` rows: a last line still being written (no newline yet) is left out."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]]


def corpus_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a prepared corpus but its manifest (which names its sources' paths), by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without their wall-clock fields, for comparing two runs."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of its own, to fill up: ``small_disk(kib)`` mounts one of ``kib`` KiB and returns
    its path. A real full file system (ENOSPC from the kernel), not a patched ``write``; needs root, as CI and
    the developers' machines have."""
    mounts = []

    def mount(kib: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="session")
def slurm():
    """A real slurm cluster on this machine (tests/slurm_cluster.py), started once and stopped at the end. Where
    slurm cannot run here the tests that need it are skipped with the reason; with CPT_REQUIRE_SLURM=1 (CI sets
    it) they fail instead, so that CI never passes without them."""
    import slurm_cluster

    cluster = slurm_cluster.start()
    if isinstance(cluster, str):
        if os.environ.get("CPT_REQUIRE_SLURM") == "1":
            pytest.fail(f"CPT_REQUIRE_SLURM=1 but {cluster}", pytrace=False)
        pytest.skip(cluster)
    yield cluster
    slurm_cluster.stop(cluster)
