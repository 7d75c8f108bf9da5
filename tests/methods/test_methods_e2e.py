"""Every anti-forgetting method from a recipe, end to end: each stage branches from the same pre-trained
weights, and a run cut back to a mid-stage checkpoint resumes with identical rows for every method."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import comparable, read_rows as rows_of, run_cpt as cpt, tiny_recipe, write_recipe

METHODS = {
    "distill": {"distill": {"lambda": 1.0, "temperature": 2.0, "kind": "logit_swap"}},
    "lora": {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    "hft": {"hft": {"seed": 3}, "freeze": ["embed_tokens"]},
    "l2": {"l2_init": {"lambda": 0.1}},
    # meta-updates at stage steps 2, 4 and 6: the mid-stage checkpoint (step 3) is inside an interval
    "reptile": {"reptile": {"every": 2, "beta": 0.5}},
}


@pytest.fixture(scope="module")
def method_run(tiny_corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    recipe = tiny_recipe(tiny_corpora, root / "run", pretrain=8)
    cpt_stage = recipe["stages"][1]
    recipe["stages"] = [recipe["stages"][0]] + [
        cpt_stage | {"name": name, "steps": 6, "start_from": "pretrain", **options} for name, options in METHODS.items()]
    recipe["checkpoint"] = {"every": 3, "keep_last": 10}
    recipe["eval"]["every"] = 3
    path = write_recipe(root / "methods.yaml", recipe)
    result = cpt("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", rows_of(root / "run"), result.stderr


def stage_rows(rows, kind, stage):
    return [r for r in rows if r["kind"] == kind and r["stage"] == stage]


def test_each_method_logs_its_terms(method_run):
    _, rows, log = method_run
    assert all("kl" in r and r["kl"] >= 0 for r in stage_rows(rows, "train", "distill"))
    assert all("l2" in r for r in stage_rows(rows, "train", "l2"))
    assert stage_rows(rows, "train", "l2")[0]["l2"] == 0.0 < stage_rows(rows, "train", "l2")[-1]["l2"]
    assert not any("kl" in r or "l2" in r for r in stage_rows(rows, "train", "lora"))
    assert [r["stage_step"] for r in stage_rows(rows, "train", "reptile") if r.get("reptile")] == [2, 4, 6]
    assert not any("reptile" in r for name in METHODS if name != "reptile" for r in stage_rows(rows, "train", name))
    starts = {r["stage"]: r for r in rows if r["kind"] == "stage" and r["event"] == "start"}
    total = starts["pretrain"]["total_params"]
    assert starts["pretrain"]["trainable_params"] == total
    assert starts["lora"]["trainable_params"] < 0.2 * starts["lora"]["total_params"]
    assert starts["hft"]["trainable_params"] < total and starts["hft"]["optimizer_state_bytes"] == \
        8 * starts["hft"]["trainable_params"]
    assert "trainable" in log and "HFT: training 7 of 14 targeted matrices" in log


def test_every_branch_starts_from_pretraining(method_run):
    _, rows, _ = method_run
    end = [r["loss"] for r in rows if r["kind"] == "eval" and r["stage"] == "pretrain"][-2:]
    for name in METHODS:
        first = [r["loss"] for r in stage_rows(rows, "eval", name)][:2]
        assert first == pytest.approx(end, abs=1e-6), name


def test_hft_and_pattern_freeze_leave_frozen_weights_untouched(method_run):
    run_dir, _, _ = method_run
    before = load_file(run_dir / "checkpoints" / "pretrain" / "step-8" / "model.safetensors")
    hft_final = max((run_dir / "checkpoints" / "hft").glob("step-*"), key=lambda p: int(p.name[5:]))
    after = load_file(hft_final / "model.safetensors")
    selection = json.loads((hft_final / "meta.json").read_text())["methods"]["hft_selection"]
    frozen = [name for name, train in selection.items() if not train]
    trained = [name for name, train in selection.items() if train]
    assert frozen and trained
    for name in frozen + ["model.embed_tokens.weight"]:
        assert torch.equal(before[name], after[name]), name
    assert all(not torch.equal(before[name], after[name]) for name in trained)


def test_lora_checkpoint_is_merged_and_carries_adapters(method_run):
    from transformers import AutoModelForCausalLM

    run_dir, rows, _ = method_run
    final = max((run_dir / "checkpoints" / "lora").glob("step-*"), key=lambda p: int(p.name[5:]))
    assert (final / "lora" / "adapter_model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    before = load_file(run_dir / "checkpoints" / "pretrain" / "step-8" / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])  # adapters merged in
    assert torch.equal(before["model.layers.0.self_attn.k_proj.weight"], after["model.layers.0.self_attn.k_proj.weight"])
    assert model.config.vocab_size == 512


@pytest.mark.parametrize("stage", list(METHODS))
def test_resume_mid_stage_with_each_method(method_run, tmp_path, stage):
    """Cut a copy of the finished run back to its checkpoint 3 steps into ``stage`` and resume it: the rows
    that follow are identical to the uninterrupted run's."""
    run_dir, rows, _ = method_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    checkpoints = sorted(copy.glob("checkpoints/*/step-*"), key=lambda p: int(p.name[5:]))
    cut = [p for p in checkpoints if p.parent.name == stage][0]  # the mid-stage one (3 steps in)
    assert not json.loads((cut / "meta.json").read_text())["stage_complete"]
    for later in checkpoints:
        if int(later.name[5:]) > int(cut.name[5:]):
            shutil.rmtree(later)
    info = json.loads((copy / "run.json").read_text())
    config = (copy / "config.yaml").read_text().replace(str(run_dir), str(copy))
    (copy / "config.yaml").write_text(config)
    (copy / "run.json").write_text(json.dumps(info))
    result = cpt("resume", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {cut}" in result.stderr
    assert comparable(rows_of(copy)) == comparable(rows)
