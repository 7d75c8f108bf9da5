"""End to end: a 2-stage run of a 2-layer model on a few KB of real text, through the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from cpt.data.loader import eval_sequences
from cpt.data.shards import TokenShard
from cpt.errors import NonFiniteLossError
from cpt.recipe import load_recipe
from cpt.schedules import lr_at
from cpt.optim import build_optimizer
from cpt.trainer import train_step

from conftest import read_rows, run_cpt as cpt, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def finished_run(tiny_corpora, tmp_path_factory):
    """The tiny recipe run once through `cpt run` with an override; tests read its outputs."""
    root = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(root / "tiny.yaml", tiny_recipe(tiny_corpora, root / "run", pretrain=40, cpt=16))
    result = cpt("run", str(recipe), "stages.pretrain.schedule.peak_lr=2e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stderr.txt").write_text(result.stderr)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return recipe, root / "run", rows


def of(rows, kind, **match):
    return [r for r in rows if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


def test_metrics_file(finished_run):
    recipe_path, run_dir, rows = finished_run
    recipe, _ = load_recipe(recipe_path, ["stages.pretrain.schedule.peak_lr=2e-2"])
    train = of(rows, "train")
    assert [r["step"] for r in train] == list(range(1, 57))
    assert [r["stage_step"] for r in train] == list(range(1, 41)) + list(range(1, 17))
    tokens_per_step = 4 * 2 * 32  # micro_batch * grad_accum * seq_len
    assert [r["tokens"] for r in train] == [tokens_per_step * s for s in range(1, 57)]
    for r in train:
        stage = recipe.stages[0] if r["stage"] == "pretrain" else recipe.stages[1]
        assert r["lr"] == pytest.approx(lr_at(stage.schedule, r["stage_step"], stage.steps))
        assert np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
    assert train[0]["lr"] == pytest.approx(2e-2 / 2)  # the override reached the schedule
    stage_rows = of(rows, "stage")
    assert [(r["stage"], r["event"], r["step"]) for r in stage_rows] == [
        ("pretrain", "start", 0), ("pretrain", "end", 40), ("cpt", "start", 40), ("cpt", "end", 56)]
    for name in ("upstream", "downstream"):
        evals = of(rows, "eval", set=name)
        assert [(r["stage"], r["stage_step"]) for r in evals] == (
            [("pretrain", s) for s in (0, 5, 10, 15, 20, 25, 30, 35, 40)] + [("cpt", s) for s in (0, 5, 10, 15, 16)])
        for r in evals:
            assert r["ppl"] == pytest.approx(np.exp(r["loss"]))
            assert r["tokens"] == 1024 // 32 * 32 and r["bpb"] > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["stages"][0]["schedule"]["peak_lr"] == 2e-2 and saved == recipe.to_dict()
    # The code stage starts on the weights the English stage ended with: its start rows are those results,
    # logged again for the new stage, not a second evaluation.
    end, start = ({r["set"]: r for r in of(rows, "eval", stage=s, stage_step=t)} for s, t in (("pretrain", 40), ("cpt", 0)))
    assert set(end) == {"upstream", "downstream"}
    assert all(start[n]["loss"] == end[n]["loss"] and start[n]["step"] == end[n]["step"] == 40 for n in end)
    log = (run_dir.parent / "stderr.txt").read_text()
    assert log.count("eval @ step 40 (cpt 0)") == 1 and log.count("(the previous stage's end)") == 1


def test_a_stage_start_is_evaluated_again_when_its_weights_may_differ():
    from cpt.config import build
    from cpt.recipe import StageConfig
    from cpt.trainer import reuses_end_eval

    def stage(**extra):
        return build(StageConfig, {"name": "s", "steps": 4, "mixture": {"a": 1.0}, **extra}, "stage")
    assert reuses_end_eval(stage(), stage(), per_stage_engine=False)
    assert not reuses_end_eval(None, stage(), per_stage_engine=False)  # the first stage
    assert not reuses_end_eval(stage(), stage(start_from="s"), per_stage_engine=False)  # other weights
    assert not reuses_end_eval(stage(lora={"rank": 2}), stage(), per_stage_engine=False)  # merged at the end
    assert not reuses_end_eval(stage(), stage(lora={"rank": 2}), per_stage_engine=False)
    assert not reuses_end_eval(stage(), stage(), per_stage_engine=True)  # DeepSpeed / FSDP rebuild the model


def test_loss_falls_and_stages_shift_the_curves(finished_run):
    _, _, rows = finished_run
    losses = [r["loss"] for r in of(rows, "train", stage="pretrain")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    up = of(rows, "eval", set="upstream")
    down = of(rows, "eval", set="downstream")
    assert up[8]["loss"] < up[0]["loss"] - 0.5  # pretraining on English lowers English loss
    cpt_down = [r["loss"] for r in down if r["stage"] == "cpt"]
    assert cpt_down[-1] < cpt_down[0] - 0.2  # the code stage lowers code loss


def test_checkpoint_loads_with_plain_transformers(finished_run, tiny_corpora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, rows = finished_run
    ckpt = run_dir / "checkpoints" / "cpt" / "step-56"
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer.decode(tokenizer("def f(x):\n\treturn x")["input_ids"]) == "def f(x):\n\treturn x"
    # The saved weights reproduce the in-run final eval loss on the same held-out windows.
    shard = TokenShard.open(next((run_dir / "data").glob("code-*")))
    windows = torch.from_numpy(eval_sequences(shard.val.tokens, 32, 1024, "code"))
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert loss == pytest.approx(of(rows, "eval", set="downstream")[-1]["loss"], abs=1e-4)


def test_checkpoint_parts(finished_run):
    _, run_dir, _ = finished_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["cpt", "pretrain"]
    ckpt = run_dir / "checkpoints" / "pretrain" / "step-40"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["stage"], meta["global_step"], meta["stage_step"], meta["stage_complete"]) == ("pretrain", 40, 40, True)
    for name, info in meta["files"].items():
        assert (ckpt / name).stat().st_size == info["bytes"]
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["counters"]["global_step"] == 40 and state["optimizer"]["state"]
    assert state["data"]["sampler"]["cursors"]["english"] == 40 * 8
    assert set(state["data"]["fingerprint"]) == {"sources", "mixture", "batch", "seed"}
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert (run_dir / "report" / "curves.png").stat().st_size > 10_000


def test_rerun_refuses_to_overwrite(finished_run):
    recipe_path, run_dir, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = cpt("run", str(recipe_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "already holds a run" in result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_missing_recipe_is_one_line(tmp_path):
    result = cpt("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.startswith("cpt: error: recipe") and result.stderr.strip().count("\n") == 0


def test_nonfinite_loss_raises_before_the_update():
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.recipe import TrainConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, TrainConfig(), 1e-3)
    batch = torch.randint(0, 64, (2, 9))
    out = train_step(model, optimizer, [batch], accelerator, 1.0)
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0 and set(out) == {"loss", "grad_norm"}
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        train_step(model, optimizer, [batch], accelerator, 1.0)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, before[key], rtol=0, atol=0, equal_nan=True), key
    assert all(p.grad is None for p in model.parameters())


def test_grad_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 give the same loss and gradients as one batch of 4 (token-normalised loss)."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.recipe import TrainConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    batch = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for micro in ([batch], [batch[:2], batch[2:]]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        optimizer = build_optimizer(model, TrainConfig(), 1e-2)
        out = train_step(model, optimizer, micro, Accelerator(cpu=True), 0.0)
        results.append((out["loss"], out["grad_norm"], model.lm_head.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    assert torch.allclose(results[0][2], results[1][2], atol=1e-6)


def test_continue_from_a_checkpoint_directory(finished_run, tiny_corpora, tmp_path):
    """A recipe whose model is a finished checkpoint (tokenizer from the same directory) starts exactly where
    the parent ended: its first eval equals the parent's last."""
    _, run_dir, parent_rows = finished_run
    recipe = tiny_recipe(tiny_corpora, tmp_path / "child")
    recipe["model"] = {"init": str(run_dir / "checkpoints" / "cpt" / "step-56")}
    del recipe["tokenizer"]
    recipe["stages"] = [recipe["stages"][1] | {"steps": 3}]
    result = cpt("run", str(write_recipe(tmp_path / "child.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "child" / "metrics.jsonl").read_text().splitlines()]
    for name in ("upstream", "downstream"):
        first = of(rows, "eval", set=name)[0]
        assert first["loss"] == pytest.approx(of(parent_rows, "eval", set=name)[-1]["loss"], abs=1e-5)


def test_branches_start_from_the_same_weights_with_replay(tiny_corpora, tmp_path):
    """Two stages branch from the end of pretraining (start_from): each begins with pretraining's final
    weights, and each replays 25% of every batch (from the reservoir buffer, or a fixed general set)."""
    recipe = tiny_recipe(tiny_corpora, tmp_path / "run", pretrain=10)
    cpt_stage = recipe["stages"][1]
    recipe["stages"] = [
        recipe["stages"][0],
        cpt_stage | {"name": "buffer", "steps": 6, "start_from": "pretrain", "mixture": {"code": 1.0},
                     "replay": {"kind": "buffer", "rate": 0.25}},
        cpt_stage | {"name": "fixed", "steps": 6, "start_from": "pretrain", "mixture": {"code": 1.0},
                     "replay": {"kind": "fixed", "rate": 0.25, "from": ["english"], "size": 5}},
    ]
    recipe["data"] = {"replay_buffer_size": 20}
    result = cpt("run", str(write_recipe(tmp_path / "branches.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("upstream", "downstream"):
        evals = of(rows, "eval", set=name)
        end_of_pretrain = [r for r in evals if r["stage"] == "pretrain"][-1]["loss"]
        for branch in ("buffer", "fixed"):
            assert [r for r in evals if r["stage"] == branch][0]["loss"] == pytest.approx(end_of_pretrain, abs=1e-6)
    data = {(r["stage"], r["source"]): r["tokens"] for r in of(rows, "data")}
    per_stage = 6 * 8 * 32  # steps * sequences per step * seq_len
    assert data[("buffer", "replay-buffer")] == per_stage // 4 and data[("buffer", "code")] == per_stage * 3 // 4
    assert data[("fixed", "english~fixed")] == per_stage // 4 and data[("fixed", "code")] == per_stage * 3 // 4
    assert "tokens per source and stage" in result.stderr and "english~fixed" in result.stderr
    assert "data budget" in result.stderr


def test_speed_options_from_the_recipe_keep_the_run(tiny_corpora, tmp_path):
    """train.activation_checkpointing reaches the model of every stage (with HFT freezing in the second) and
    leaves the losses those of the plain run. (train.compile goes through the same call, apply_speed_options;
    its arithmetic is checked in tests/test_model.py, where it costs one compilation instead of four.)"""
    curves = {}
    for name, options in (("plain", []), ("fast", ["train.activation_checkpointing=true"])):
        recipe = tiny_recipe(tiny_corpora, tmp_path / name, pretrain=3, cpt=3)
        recipe["stages"][1]["hft"] = {"seed": 0}
        recipe["run"]["data_dir"] = str(tmp_path / "data")
        result = cpt("run", str(write_recipe(tmp_path / f"{name}.yaml", recipe)), *options)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count("model: activation checkpointing") == (2 if options else 0)  # both stages
        curves[name] = [(r["kind"], r["step"], r["loss"]) for r in read_rows(tmp_path / name)
                        if r["kind"] in ("train", "eval")]
    assert [r[:2] for r in curves["fast"]] == [r[:2] for r in curves["plain"]]
    assert [r[2] for r in curves["fast"]] == pytest.approx([r[2] for r in curves["plain"]], rel=1e-5)
