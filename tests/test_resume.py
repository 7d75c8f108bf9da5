"""Resume, branch and export through the CLI: a run killed with SIGKILL mid-stage resumes bit-identically."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import comparable, read_rows as rows_of, run_cpt as cpt, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def recipe_dict(tiny_corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(tiny_corpora, root / "unused", pretrain=20, cpt=80)
    recipe["checkpoint"] = {"every": 10, "keep_last": 2}
    recipe["eval"]["every"] = 25
    recipe["run"]["data_dir"] = str(root / "data")
    # an automatic replay rate, which changes after each evaluation of the cpt stage (and must resume exactly)
    recipe["stages"][1].update(mixture={"code": 1.0}, replay={
        "rate": "auto", "from": ["english"], "start": 0.1, "gain": 0.1, "hold": {"set": "upstream", "tolerance": 0.02}})
    return recipe, root


@pytest.fixture(scope="module")
def uninterrupted(recipe_dict):
    recipe, root = recipe_dict
    path = write_recipe(root / "full.yaml", recipe | {"run": recipe["run"] | {"dir": str(root / "full")}})
    result = cpt("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "full"


def test_killed_run_resumes_bit_identically(recipe_dict, uninterrupted):
    recipe, root = recipe_dict
    run_dir = root / "killed"
    path = write_recipe(root / "killed.yaml", recipe | {"run": recipe["run"] | {"dir": str(run_dir)}})
    proc = subprocess.Popen([sys.executable, "-m", "cpt", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        steps = [r["step"] for r in rows_of(run_dir) if r["kind"] == "train"] if metrics.exists() else []
        if steps and steps[-1] >= 45:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [r["step"] for r in rows_of(run_dir) if r["kind"] == "train"][-1]
    assert 45 <= killed_at < 100

    # A checkpoint the kill interrupted mid-write: a temporary directory, and a newer one with a truncated file.
    ckpts = run_dir / "checkpoints" / "cpt"
    newest = max(ckpts.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert newest.name == "step-40"
    (ckpts / ".step-50-partial").mkdir()
    broken = ckpts / "step-50"
    shutil.copytree(newest, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["global_step"] = 50
    (broken / "meta.json").write_text(json.dumps(meta))
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)

    result = cpt("resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint" in result.stderr and "step-50" in result.stderr and "truncated" in result.stderr
    assert "resuming from" in result.stderr and "step-40" in result.stderr
    assert "removed 1 unfinished checkpoint write" in result.stderr and not (ckpts / ".step-50-partial").exists()
    # Bit-identical losses and replay rates, and no duplicate or missing metrics rows.
    assert comparable(rows_of(run_dir)) == comparable(rows_of(uninterrupted))
    rates = [(r["step"], r["rate"]) for r in rows_of(uninterrupted) if r["kind"] == "replay"]
    assert [step for step, _ in rates] == [20, 45, 70, 95, 100] and len({rate for _, rate in rates}) >= 3, rates
    # keep_last=2 mid-stage checkpoints plus every stage's final one
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("*/step-*"))
    assert kept == ["step-100", "step-20", "step-80", "step-90"]


def test_resume_at_a_stage_boundary_starts_the_next_stage_as_the_run_did(recipe_dict, uninterrupted):
    """Resumed from the first stage's final checkpoint (the next stage has not started), the run goes on as the
    uninterrupted one did: the next stage's fresh optimizer is not handed the finished stage's moments."""
    _, root = recipe_dict
    run_dir = root / "boundary"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "cpt")
    result = cpt("resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "pretrain/step-20" in result.stderr
    assert comparable(rows_of(run_dir)) == comparable(rows_of(uninterrupted))


def test_resume_refuses_a_recipe_change_that_matters(recipe_dict, uninterrupted):
    recipe, root = recipe_dict
    result = cpt("resume", str(uninterrupted), "stages.cpt.schedule.peak_lr=0.5", "train.log_every=3")
    assert result.returncode == 2
    assert "stages[1].schedule.peak_lr: 0.01 -> 0.5" in result.stderr and "log_every" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_resume_after_the_end_is_a_no_op_and_harmless_changes_pass(recipe_dict, uninterrupted):
    before = comparable(rows_of(uninterrupted))
    result = cpt("resume", str(uninterrupted), "train.log_every=3", "eval.every=7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert comparable(rows_of(uninterrupted)) == before


def test_branch_records_lineage_and_export_loads(recipe_dict, uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe, root = recipe_dict
    ckpt = uninterrupted / "checkpoints" / "pretrain" / "step-20"
    branch = recipe | {"stages": [recipe["stages"][1] | {"steps": 4}],
                       "run": recipe["run"] | {"dir": str(tmp_path / "{name}")}}
    result = cpt("branch", str(ckpt), str(write_recipe(tmp_path / "b.yaml", branch)), "--name", "mix2",
                 "--with-optimizer", "--with-data")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "mix2"
    meta = json.loads(next((run_dir / "checkpoints").glob("*/step-4/meta.json")).read_text())
    assert meta["lineage"]["checkpoint"] == str(ckpt.resolve()) and meta["lineage"]["step"] == 20
    assert meta["lineage"]["with_optimizer"] and meta["lineage"]["with_data"]
    # the branch's first eval is the parent's eval at the branch point (same weights, same eval windows)
    parent = [r for r in rows_of(uninterrupted) if r["kind"] == "eval" and r["step"] == 20][0]
    child = [r for r in rows_of(run_dir) if r["kind"] == "eval"][0]
    assert child["loss"] == pytest.approx(parent["loss"], abs=1e-6)
    # --with-data continues the parent's cursor: english was read 20 * 8 times before the branch point
    state = torch.load(next((run_dir / "checkpoints").glob("*/step-4/train_state.pt")), weights_only=True)
    assert state["data"]["sampler"]["cursors"]["english"] > 20 * 8

    tree = cpt("runs", str(tmp_path)).stdout
    assert "mix2" in tree and "step 20" in tree

    out = tmp_path / "exported"
    assert cpt("export", str(run_dir / "checkpoints" / "cpt" / "step-4"), str(out)).returncode == 0
    assert not (out / "train_state.pt").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "cpt" / "step-4")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_run_with_resume_flag_continues_the_recipes_run(recipe_dict, uninterrupted):
    _, root = recipe_dict
    before = comparable(rows_of(uninterrupted))
    result = cpt("run", str(root / "full.yaml"), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and comparable(rows_of(uninterrupted)) == before
    missing = cpt("run", str(root / "full.yaml"), "--resume", f"run.dir={root / 'nowhere'}")
    assert missing.returncode == 2 and "is not a cpt run directory" in missing.stderr


def test_edited_or_missing_metadata_is_never_trusted(recipe_dict, uninterrupted):
    """meta.json says where a resume starts and how many metrics rows it keeps: an edit (even one that fixes
    the checksum) or a missing file is skipped with a warning naming it, and an older checkpoint is used."""
    _, root = recipe_dict
    run_dir = root / "edited"
    shutil.copytree(uninterrupted, run_dir)
    ckpts = run_dir / "checkpoints" / "cpt"
    meta = json.loads((ckpts / "step-100" / "meta.json").read_text())
    meta["metrics_rows"] = 3  # would cut metrics.jsonl to 3 rows
    (ckpts / "step-100" / "meta.json").write_text(json.dumps(meta))
    from cpt.checkpoint import _meta_hash

    meta = json.loads((ckpts / "step-90" / "meta.json").read_text())
    meta["global_step"] = 10  # would roll the run back, checksum recomputed
    meta["meta_sha256"] = _meta_hash(meta)
    (ckpts / "step-90" / "meta.json").write_text(json.dumps(meta))
    (ckpts / "step-80" / "meta.json").unlink()
    result = cpt("resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "step-100" in err and "was edited after it was written" in err
    assert "step-90" in err and "disagrees with train_state.pt (global_step 10 vs 90)" in err
    assert "skipping checkpoint" in err and "step-80: no readable meta.json" in err
    assert "resuming from" in err and "pretrain/step-20" in err
    assert comparable(rows_of(run_dir)) == comparable(rows_of(uninterrupted))


def test_a_tampered_train_state_is_one_line(recipe_dict, uninterrupted, tmp_path):
    """A train_state.pt that pickles an object (not tensors and plain values) is refused in one line, without
    torch's advice to load it with weights_only=False, and its code never runs."""
    import pickle

    _, root = recipe_dict
    run_dir = tmp_path / "tampered"
    shutil.copytree(uninterrupted, run_dir)
    from cpt.checkpoint import _meta_hash, sha256_file

    for ckpt in run_dir.glob("checkpoints/*/step-*"):
        with open(ckpt / "train_state.pt", "wb") as f:
            pickle.dump(subprocess.Popen, f)  # an arbitrary global, as a malicious file would reference
        meta = json.loads((ckpt / "meta.json").read_text())  # resealed, as a careful attacker would
        meta["files"]["train_state.pt"] = {"bytes": (ckpt / "train_state.pt").stat().st_size,
                                           "sha256": sha256_file(ckpt / "train_state.pt")}
        meta["meta_sha256"] = _meta_hash(meta)
        (ckpt / "meta.json").write_text(json.dumps(meta))
    branch = cpt("branch", str(run_dir / "checkpoints" / "cpt" / "step-100"), str(root / "full.yaml"),
                 f"run.dir={tmp_path / 'child'}", "--with-optimizer")
    assert branch.returncode == 2 and branch.stderr.count("\n") == 1, branch.stderr[-2000:]
    assert "weights_only" not in branch.stderr and "Traceback" not in branch.stderr
    assert "train_state.pt is not a state cpt wrote" in branch.stderr
    resumed = cpt("resume", str(run_dir))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr and "weights_only" not in resumed.stderr
    assert "not a state cpt wrote" in resumed.stderr and "no intact checkpoint" in resumed.stderr, resumed.stderr[-2000:]
