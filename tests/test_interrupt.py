"""Stopping by hand and stopping on a blow-up: Ctrl-C writes a checkpoint and the run resumes from it bit for
bit, a second Ctrl-C stops at once; a NaN loss names the last checkpoint whose weights were still sane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpt import preemption
from cpt.checkpoint import last_sane
from cpt.errors import NonFiniteLossError

from conftest import comparable, read_rows, run_cpt as cpt, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def recipe(tiny_corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    recipe = tiny_recipe(tiny_corpora, root / "unused", pretrain=4, cpt=400)
    recipe["data"] = {"max_epochs": 1000}
    recipe["eval"]["every"] = 100
    recipe["checkpoint"] = {"every": 50, "keep_last": 2}
    recipe["run"]["data_dir"] = str(root / "data")
    return recipe, root


def at(recipe: tuple[dict, Path], name: str, **changes) -> tuple[Path, Path]:
    body, root = recipe
    body = {**body, **changes, "run": body["run"] | {"dir": str(root / name)}}
    return write_recipe(root / f"{name}.yaml", body), root / name


def test_ctrl_c_checkpoints_and_the_run_resumes_exactly(recipe):
    path, run_dir = at(recipe, "stopped")
    proc = subprocess.Popen([sys.executable, "-m", "cpt", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or not any(
            r["kind"] == "train" and r["step"] >= 20 for r in read_rows(run_dir)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == preemption.EXIT_CODE, err[-3000:]
    assert "Ctrl-C again" in err and "stopping on SIGINT" in err
    step = [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"][-1]
    assert 20 <= step < 404 and (run_dir / "checkpoints" / "cpt" / f"step-{step}").is_dir()

    result = cpt("resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step-{step}" in result.stderr
    full_path, full = at(recipe, "full")
    assert cpt("run", str(full_path)).returncode == 0
    assert comparable(read_rows(run_dir)) == comparable(read_rows(full))


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with preemption.stop_signals():
            os.kill(os.getpid(), signal.SIGINT)
            assert preemption.received() == "SIGINT"  # the first: a stop at the next step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here
    assert signal.getsignal(signal.SIGINT) is before


def test_a_nan_names_the_last_checkpoint_with_sane_weights(recipe, monkeypatch, capsys):
    """Weights that blow up (x 1e6 in step 7) and a NaN after it (the next gradient overflows; a NaN loss is
    forced at step 9 should it not): the message names step-6, whose weights were sane, not step-7, written
    after the blow-up."""
    import cpt.trainer as trainer
    from cpt.cli import main

    path, run_dir = at(recipe, "blowup", checkpoint={"every": 1, "keep_last": 10})
    real, steps = trainer.train_step, []

    def train_step(model, *args, **kwargs):
        steps.append(1)
        if len(steps) == 9:
            raise NonFiniteLossError("loss is nan")
        out = real(model, *args, **kwargs)
        if len(steps) == 7:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e6)
        return out
    monkeypatch.setattr(trainer, "train_step", train_step)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is nan at stage 'cpt'" in err and "last sane checkpoint" in err, err
    assert err.endswith(str(run_dir / "checkpoints" / "cpt" / "step-6")), err
    metas = {p.name: json.loads((p / "meta.json").read_text()) for p in run_dir.glob("checkpoints/*/step-*")}
    assert metas["step-7"]["max_abs_weight"] > 1e5 and metas["step-6"]["max_abs_weight"] < 10
    assert last_sane(run_dir) == run_dir / "checkpoints" / "cpt" / "step-6"
