"""Engines across processes: DDP, DeepSpeed ZeRO-2/3 and FSDP on 2 CPU processes (gloo) train like 1 process,
resume after a SIGKILL, compose with the anti-forgetting methods, and refuse what cannot work at validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from cpt.data.loader import eval_sequences
from cpt.data.shards import TokenShard
from cpt.distributed import DistributedConfig, deepspeed_config
from cpt.errors import CptError, RecipeError
from cpt.recipe import TrainConfig, load_recipe

from conftest import read_rows, run_cpt as cpt, tiny_recipe, write_recipe

ENGINES = {"ddp": {"engine": "ddp"}, "zero2": {"engine": "deepspeed", "zero_stage": 2},
           "zero3": {"engine": "deepspeed", "zero_stage": 3}, "fsdp": {"engine": "fsdp"}}
HERE = Path(__file__).parent


def launch(world: int, *args: str, log: Path, script: Path | None = None) -> subprocess.Popen:
    """``cpt ARGS`` (or ``script ARGS``) under torchrun with ``world`` CPU processes (gloo), one torch thread
    each, output to ``log`` (a file, not a pipe: a full pipe nobody reads would block the job)."""
    program = [str(script)] if script else ["-m", "cpt"]
    # --standalone: a free port of its own, so that launches running side by side (pytest -n) do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               *program, *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=600)
    output = proc.log.read_text()
    assert proc.returncode == 0, output[-4000:]
    return output


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_rows(run_dir) if r["kind"] in ("train", "eval")]


def loss_rows(run_dir: Path) -> dict[tuple[str, int, str | None], float]:
    """(kind, step, eval set) -> loss of every train and eval row."""
    return {(r["kind"], r["step"], r.get("set")): r["loss"] for r in read_rows(run_dir) if r["kind"] in ("train", "eval")}


def assert_same_curve(run_dir: Path, reference: Path, prefix: bool = False) -> None:
    ours, theirs = losses(run_dir), losses(reference)
    theirs = theirs[:len(ours)] if prefix else theirs
    assert [r[:2] for r in ours] == [r[:2] for r in theirs]  # same rows: nothing repeated or missing
    assert [r[2] for r in ours] == pytest.approx([r[2] for r in theirs], abs=2e-4)


def recipe_for(tiny_corpora, root: Path, name: str, world: int, distributed: dict | None = None, **steps) -> dict:
    """The tiny recipe with a global batch of 8 sequences on ``world`` processes."""
    recipe = tiny_recipe(tiny_corpora, root / name, **steps)
    recipe["train"]["micro_batch"] = 4 // world
    recipe["run"]["data_dir"] = str(root / "data")
    if distributed:
        recipe["distributed"] = distributed
    return recipe


# --- training, SIGKILL and resume ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_recipe(tiny_corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")

    def make(name: str, world: int, distributed: dict | None = None) -> Path:
        recipe = recipe_for(tiny_corpora, root, name, world, distributed, pretrain=8, cpt=72)
        recipe["checkpoint"] = {"every": 24, "keep_last": 2}
        recipe["eval"]["every"] = 12
        return write_recipe(root / f"{name}.yaml", recipe)
    return make, root


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_run_resumes_after_sigkill_and_exports_whole_weights(engine, long_recipe):
    """A ZeRO-3 or FSDP run on 2 processes killed with SIGKILL (every process, as a lost node would be) past
    step 36 and resumed from its step-24 checkpoint (both ranks' optimizer state: ZeRO shards, or FSDP's state
    gathered whole) repeats the killed run's rows bit for bit (to float32 rounding), with no row repeated or
    missing. Its exported
    final checkpoint (weights gathered from both ranks), loaded with plain transformers, gives the loss the run
    measured."""
    make, root = long_recipe
    path, run_dir = make(engine, 2, ENGINES[engine]), root / engine
    proc = launch(2, "run", str(path), log=root / f"{engine}.log")
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.log.read_text()[-4000:]
        rows = read_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if any(r["kind"] == "train" and r["step"] >= 36 for r in rows):
            break
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill every process of the job.
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)
    proc.wait()
    before = loss_rows(run_dir)
    newest = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("*/step-*"))
    assert newest == 24, f"killed after the step-{newest} checkpoint, not between steps 36 and 48"

    err = finish(launch(2, "resume", str(run_dir), log=root / f"{engine}-resume.log"))
    name = {"zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP"}[engine]
    assert "resuming from" in err and "step-24" in err and f"({name})" in err
    assert "global batch 8 = micro-batch 2 x grad_accum 2 x 2 process(es)" in err
    after = loss_rows(run_dir)
    repeated = {key: loss for key, loss in after.items() if key in before and key[1] > 24}
    # Bit for bit on any CPU: the resumed run computes what the killed one did, in the same order.
    assert len(repeated) >= 12 and repeated == {key: before[key] for key in repeated}
    assert [r["step"] for r in read_rows(run_dir) if r["kind"] == "train"] == list(range(1, 81))
    # Every stage ran on the engine asked for, the second one included (a stage after the first once fell back
    # to DDP unseen, and resuming it under FSDP changed its numbers in the last bits).
    starts = [r for r in read_rows(run_dir) if r["kind"] == "stage" and r["event"] == "start"]
    assert [(r["stage"], r["engine"]) for r in starts] == [("pretrain", name.split()[0]), ("cpt", name.split()[0])]
    assert f"engine {name.split()[0]}" in err  # the resumed stage

    final = run_dir / "checkpoints" / "cpt" / "step-80"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == ENGINES[engine]["engine"]
    if engine == "zero3":  # every rank's ZeRO shard is in the checkpoint and covered by its hashes
        assert len([f for f in meta["files"] if f.startswith("deepspeed/state/") and "optim_states" in f]) == 2
    else:  # one whole optimizer state, keyed by parameter name, with both moments of every parameter whole
        optimizer = torch.load(final / "train_state.pt", weights_only=True)["optimizer"]
        weights = load_file(final / "model.safetensors")
        assert optimizer["state"]["model.embed_tokens.weight"]["exp_avg"].shape == weights["model.embed_tokens.weight"].shape
        assert set(optimizer["state"]) >= set(weights) - {"lm_head.weight"}
    # its optimizer state loads only into a run of the same engine: a 1-process DDP branch is refused
    result = cpt("branch", str(final), str(make(f"{engine}-branch", 1)), "--with-optimizer")
    article = "an" if engine == "fsdp" else "a"
    assert result.returncode == 2 and f"optimizer state comes from {article} {name.split()[0]} checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    result = cpt("export", str(final), str(root / f"{engine}-export"))
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / f"{engine}-export").eval()
    shard = TokenShard.open(next((root / "data").glob("code-*")))
    windows = torch.from_numpy(eval_sequences(shard.val.tokens, 32, 1024, "code"))
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert loss == pytest.approx(after[("eval", 80, "downstream")], abs=1e-4)


def test_ranks_read_disjoint_halves_of_the_one_process_data(long_recipe):
    """The batches each rank's trainer takes, on 2 processes: disjoint, and together exactly the rows the
    1-process trainer takes, step by step (the split is the trainer's, the same under every engine)."""
    make, root = long_recipe
    out = root / "batches"
    path = make("batches1", 1)
    subprocess.run([sys.executable, str(HERE / "rank_batches.py"), str(path), str(out / "w1")], check=True,
                   capture_output=True)
    finish(launch(2, str(make("batches2", 2)), str(out / "w2"), script=HERE / "rank_batches.py",
                  log=root / "batches2.log"))
    single = np.load(out / "w1" / "rank0.npy")
    halves = [np.load(out / "w2" / f"rank{r}.npy") for r in (0, 1)]
    assert single.shape == (12, 8, 33) and halves[0].shape == halves[1].shape == (12, 4, 33)
    for step in range(12):
        rows = {tuple(r) for r in single[step]}
        mine, theirs = ({tuple(r) for r in h[step]} for h in halves)
        assert len(rows) == 8 and not mine & theirs and mine | theirs == rows


# --- the methods under every engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def methods_recipe(tiny_corpora, tmp_path_factory):
    """pretrain; then cpt with replay, self-distillation, HFT and a frozen embedding; then a LoRA stage."""
    root = tmp_path_factory.mktemp("methods")

    def make(name: str, world: int, distributed: dict | None = None, lora: bool = True) -> Path:
        recipe = recipe_for(tiny_corpora, root, name, world, distributed, pretrain=4, cpt=4)
        recipe["stages"][1].update(mixture={"code": 1.0}, replay={"rate": 0.25, "from": ["english"]},
                                   distill={"lambda": 0.5}, hft={"seed": 3}, freeze=["embed_tokens"])
        if lora:
            recipe["stages"].append({"name": "adapt", "steps": 4, "mixture": {"code": 1.0}, "lora": {"rank": 4},
                                     "schedule": {"peak_lr": 1e-2, "warmup_steps": 1}})
        return write_recipe(root / f"{name}.yaml", recipe)
    result = cpt("run", str(make("single", 1)))
    assert result.returncode == 0, result.stderr[-3000:]
    return make, root


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3-offload", "fsdp", "fsdp-offload"])
def test_two_processes_train_like_one_with_every_method(engine, methods_recipe):
    """With the same global batch and seed, 2 processes give the 1-process losses (and KL terms) through
    replay, distillation, HFT, freezing and LoRA. ZeRO-3 and FSDP refuse LoRA (see the refusal test), so their
    runs stop after the cpt stage; ZeRO-3 also offloads its weights to the CPU between uses."""
    make, root = methods_recipe
    distributed = ENGINES[engine.split("-")[0]] | ({"offload_params": True} if engine.endswith("offload") else {})
    zero3 = engine.startswith(("zero3", "fsdp"))
    finish(launch(2, "run", str(make(engine, 2, distributed, lora=not zero3)), log=root / f"{engine}.log"))
    assert_same_curve(root / engine, root / "single", prefix=zero3)
    kl = [(r["step"], r["kl"]) for r in read_rows(root / engine) if "kl" in r]
    reference = [(r["step"], r["kl"]) for r in read_rows(root / "single") if "kl" in r]
    assert len(kl) == 4 and [s for s, _ in kl] == [s for s, _ in reference]
    assert [v for _, v in kl] == pytest.approx([v for _, v in reference], abs=1e-5)
    if not zero3:
        assert (root / engine / "checkpoints" / "adapt" / "step-12" / "lora").is_dir()


def test_optimizer_offload_keeps_adamw_and_the_recipes_groups(monkeypatch):
    """With offload_optimizer, Accelerate swaps cpt's optimizer for DeepSpeed's CPU Adam (a compiled op, stood
    in for here). From a torch AdamW it keeps decoupled weight decay and each group's betas, eps and decay; any
    other optimizer class becomes Adam with L2 decay there. (Checked by hand with the real op: a 2-process ZeRO-2
    run with optimizer offload gives the 1-process losses; with cpt's optimizer built as DeepSpeed's CPU Adam
    it drifted from the second step.)"""
    import deepspeed.ops.adam
    from accelerate.utils.deepspeed import map_pytorch_optim_to_deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.optim import build_optimizer

    made = {}

    class CPUAdam(torch.optim.Optimizer):
        def __init__(self, params, adamw_mode: bool, **defaults):
            made["adamw_mode"] = adamw_mode
            super().__init__(params, defaults)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", CPUAdam)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    train = TrainConfig(weight_decay=0.1, beta2=0.95, eps=1e-6)
    offloaded = map_pytorch_optim_to_deepspeed(build_optimizer(model, train, 1e-3))
    assert isinstance(offloaded, CPUAdam) and made["adamw_mode"] is True
    assert [g["weight_decay"] for g in offloaded.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in offloaded.param_groups)
    assert sum(len(g["params"]) for g in offloaded.param_groups) == len(list(model.parameters()))


# --- configuration and refusals -------------------------------------------------------------------------------

def test_generated_deepspeed_config_states_the_recipes_batch_and_precision(tmp_path):
    train = TrainConfig(micro_batch=3, grad_accum=5, grad_clip=0.5)
    config = deepspeed_config(DistributedConfig(engine="deepspeed", zero_stage=3, offload_optimizer=True,
                                                offload_params=True), train, "bf16", tmp_path)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 5
    assert config["gradient_clipping"] == 0.5 and "train_batch_size" not in config  # micro x accum x world
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in config and "scheduler" not in config


def test_a_users_deepspeed_file_is_completed_or_refused(tmp_path):
    train = TrainConfig(micro_batch=2, grad_accum=4)
    ds = DistributedConfig(engine="deepspeed", zero_stage=3, deepspeed_config="ds.json")

    def with_file(content) -> dict:
        (tmp_path / "ds.json").write_text(content if isinstance(content, str) else json.dumps(content))
        return deepspeed_config(ds, train, "no", tmp_path)

    config = with_file({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9}})
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 1e9 and "train_batch_size" not in config
    refusals = [({"optimizer": {"type": "AdamW"}}, "'optimizer' section, but cpt builds AdamW"),
                ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
                ({"fp16": {"enabled": True}}, "use train.mixed_precision: bf16"),
                ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu is 16 but train.micro_batch is 2"),
                ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage is 2 but distributed.zero_stage is 3"),
                ("{not json", "is not valid JSON")]
    for content, message in refusals:
        with pytest.raises(CptError, match=message.replace("(", r"\(")):
            with_file(content)
    with pytest.raises(CptError, match="cannot read"):
        deepspeed_config(DistributedConfig(engine="deepspeed", deepspeed_config="missing.json"), train, "no", tmp_path)


REFUSED = [
    ({"engine": "deepspeed", "zero_stage": 3}, {"lora": {"rank": 4}}, "stages[1].lora: does not combine with DeepSpeed ZeRO-3"),
    ({"engine": "deepspeed", "zero_stage": 3}, {"l2_init": {"lambda": 0.1}}, "stages[1].l2_init: does not combine"),
    ({"engine": "deepspeed", "zero_stage": 3}, {"reset_optimizer": False}, "stages[1].reset_optimizer: false does not"),
    ({"engine": "deepspeed"}, {"__precision": "fp16"}, "train.mixed_precision: fp16 under DeepSpeed"),
    ({"engine": "deepspeed", "offload_params": True}, {}, "distributed.offload_params: offloads the weights ZeRO-3"),
    ({"zero_stage": 3}, {}, "distributed.zero_stage: is a DeepSpeed option"),
    ({"offload_optimizer": True}, {}, "distributed.offload_optimizer: is a DeepSpeed option"),
    ({"engine": "deepspeed", "zero_stage": 4}, {}, "distributed.zero_stage: must be 1, 2 or 3"),
    ({"engine": "fsdb"}, {}, "distributed.engine: 'fsdb' is not allowed"),
    ({"engine": "fsdp"}, {"lora": {"rank": 4}}, "stages[1].lora: does not combine with FSDP"),
    ({"engine": "fsdp"}, {"l2_init": {"lambda": 0.1}}, "stages[1].l2_init: does not combine with FSDP"),
    ({"engine": "fsdp"}, {"reset_optimizer": False}, "stages[1].reset_optimizer: false does not combine with FSDP"),
    ({"engine": "fsdp"}, {"__precision": "fp16"}, "train.mixed_precision: fp16 under FSDP"),
    ({"engine": "fsdp", "zero_stage": 3}, {}, "distributed.zero_stage: is a DeepSpeed option"),
    ({"offload_params": True}, {}, "distributed.offload_params: needs a sharding engine"),
    ({"engine": "fsdp"}, {"__compile": True}, "train.compile: is not wired for FSDP"),
    ({"engine": "deepspeed"}, {"__compile": True}, "train.compile: is not wired for DeepSpeed"),
    ({"engine": "deepspeed"}, {"reptile": {"every": 5, "beta": 0.5}}, "stages[1].reptile: does not combine with DeepSpeed"),
    ({"engine": "fsdp"}, {"reptile": {"every": 5, "beta": 0.5}}, "stages[1].reptile: does not combine with FSDP"),
]


@pytest.mark.parametrize("distributed, stage, message", REFUSED)
def test_what_cannot_work_is_refused_at_validation(distributed, stage, message, tiny_corpora, tmp_path):
    recipe = tiny_recipe(tiny_corpora, tmp_path / "run")
    recipe["distributed"] = distributed
    if "__precision" in stage:
        recipe["train"]["mixed_precision"] = stage.pop("__precision")
    if "__compile" in stage:
        recipe["train"]["compile"] = stage.pop("__compile")
    recipe["stages"][1].update(stage)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(path)
    if "lora" in message:  # and through the CLI: one line, exit 2
        result = cpt("check", str(path))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_every_rank_applies_the_same_automatic_replay_rate_at_the_same_step(tiny_corpora, tmp_path):
    """On 2 gloo processes the held set's loss is reduced over the ranks, so both controllers see the same
    losses and set the same rates at the same steps, and both samplers draw the same sources: bit for bit."""
    recipe = recipe_for(tiny_corpora, tmp_path, "auto", 2, pretrain=8, cpt=24)
    recipe["eval"]["every"] = 4
    recipe["stages"][1].update(mixture={"code": 1.0}, replay={
        "rate": "auto", "from": ["english"], "start": 0.25, "gain": 0.1, "hold": {"set": "upstream", "tolerance": 0.01}})
    path = write_recipe(tmp_path / "auto.yaml", recipe)
    finish(launch(2, str(path), str(tmp_path / "out"), script=HERE / "rank_replay.py", log=tmp_path / "auto.log"))
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    steps = [d[0] for d in ranks[0]]
    assert steps == [8, 12, 16, 20, 24, 28, 32]  # the cpt stage's start, every 4 steps, its end
    assert len({d[2] for d in ranks[0]}) > 2, ranks[0]  # the rate did change
