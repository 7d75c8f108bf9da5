"""Benchmark training throughput: cpt's ``train_step`` against the Hugging Face ``Trainer`` on the same model.

Both sides train the same scratch Llama (built by ``cpt.model.build_model``, identical initial weights) on the
same pre-tokenized, packed batches (random token ids, ``[B, T+1]`` windows: inputs are the first T tokens,
targets the last T, so both sides compute the loss over the same ``B x T`` targets; the HF side passes them
as ``shift_labels``), with the same micro-batch, gradient accumulation, precision (autocast), gradient
clipping (1.0) and AdamW (betas, eps, weight decay from ``TrainConfig``; the HF ``optim`` is chosen to match
the fused/foreach setting of ``cpt.optim.build_optimizer``). Each side runs in its own process, the two
alternating over several rounds, so load from other jobs falls on both alike; a step is timed from the end
of one optimizer step to the end of the next (batch draw included), the first ``--warmup`` steps of each
process are left out, and the figure is the median over all timed steps of all rounds.

Also measured, in the same run:

- peak matmul throughput: a timed ``N x N`` matmul in the training dtype (bf16 under autocast, else fp32),
  between rounds; MFU = model FLOPs per second / that peak. Model FLOPs per token = 3 x (2 x the weights of
  every matmul, the LM head included) + 3 x (2 x 2 x T x hidden per layer for attention scores and values,
  full square, as in the PaLM appendix);
- peak memory: the worker process's ``ru_maxrss`` (``os.wait4``), and ``torch.cuda.max_memory_allocated`` on GPU;
- the cost of cpt's extras at the demo's defaults (demo model, fp32 on CPU as ``mixed_precision: auto``
  resolves there): evaluation (the demo recipe's `eval` block: sets, tokens and cadence; a stage start on the
  previous stage's end weights is not evaluated again),
  a ``metrics.jsonl`` row per step, and the end-of-stage checkpoints, each amortised over the demo's 350 steps
  and compared with the bare step;
- data preparation: tokens/s of ``cpt.data.shards.write_shard`` on KJV and the Python stdlib with the demo's
  sentencepiece tokenizer (``cpt prepare recipes/demo.yaml`` trains it), with 1 and 2 workers (``cpt prepare
  --workers``: processes that tokenize), the two taking turns over the rounds (median).

Usage::

    .venv/bin/python scripts/bench_train.py                  # full run; writes JSON and the BENCHMARKS.md section
    .venv/bin/python scripts/bench_train.py --quick --no-write   # smoke run (a minute or two)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmarks_md  # noqa: E402
from benchmarks_md import write_section  # noqa: E402

HEADING = "## Training throughput"
TOKENIZER = ROOT / "runs" / "demo" / "data" / "tokenizer"
PREPARE_CORPORA = ("kjv", "python-stdlib")
PREPARE_WORKERS = ("1", "2")
# name -> (ArchConfig fields, vocab, seq_len, micro_batch, grad_accum)
CONFIGS = {
    "demo": (dict(layers=4, hidden=128, heads=4), 4096, 256, 8, 1),
    "llama-110m": (dict(layers=12, hidden=768, heads=12, intermediate=2048), 32000, 256, 2, 2),
    # Llama-3.2-1B's shape, for a GPU (--configs llama-1b): too slow for this project's CPU machine.
    "llama-1b": (dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192), 128256, 2048, 4, 1),
}
LR = 3e-4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchTokenizer:
    """The few tokenizer attributes ``build_model`` reads, for a vocabulary of random ids."""

    def __init__(self, vocab: int):
        self.vocab, self.bos_token_id, self.eos_token_id = vocab, 1, 2

    def __len__(self) -> int:
        return self.vocab


def device_and_dtype(precision: str):
    """The device, and the autocast dtype for ``precision`` ('auto': bf16 where the hardware has it)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if bf16 else "no"
    return device, precision


def build(config: str, seed: int = 0):
    """The benchmark model and its ``TrainConfig``: same weights for the same seed on every side."""
    import torch

    from cpt.model import ArchConfig, ModelConfig, build_model
    from cpt.recipe import TrainConfig

    arch, vocab, seq_len, micro_batch, grad_accum = CONFIGS[config]
    torch.manual_seed(seed)
    # Built where it trains: a 1B model's random init takes seconds on a GPU, minutes on a few CPU cores.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = build_model(ModelConfig(arch=ArchConfig(**arch)), BenchTokenizer(vocab), seq_len, ROOT)
    return model, TrainConfig(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum)


def batches(config: str, steps: int):
    """``steps`` global batches of random packed windows ``[micro_batch * grad_accum, T + 1]`` (seeded)."""
    import torch

    _, vocab, seq_len, micro_batch, grad_accum = CONFIGS[config]
    generator = torch.Generator().manual_seed(1)
    return torch.randint(vocab, (steps * micro_batch * grad_accum, seq_len + 1), generator=generator)


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights (LM head included, embedding lookup not) + attention."""
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        matmul += model.get_input_embeddings().weight.numel()
    attention = 2 * 2 * seq_len * cfg.hidden_size * cfg.num_hidden_layers
    return 3 * (2 * matmul + attention)


def peak_matmul(precision: str, n: int, repeats: int) -> float:
    """FLOP/s of an ``n x n`` matmul in the training dtype (the best of ``repeats`` timed runs)."""
    import torch

    device, precision = device_and_dtype(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def variant_options(variant: str) -> dict:
    """``train.*`` settings of a variant: '+'-joined ``compile``, ``checkpointing`` and a ``train.loss`` name."""
    parts = set(variant.split("+")) - {""}
    unknown = parts - {"compile", "checkpointing", "chunked", "fused_linear"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {', '.join(sorted(unknown))}: use compile, checkpointing, "
                         "chunked, fused_linear joined by '+'")
    loss = next((p for p in parts if p in ("chunked", "fused_linear")), "auto")
    return {"compile": "compile" in parts, "activation_checkpointing": "checkpointing" in parts, "loss": loss}


def cpt_steps(config: str, precision: str, count: int, variant: str = "", distributed=None):
    """cpt's side, built as the trainer builds it: ``step(i)`` runs ``train_step`` on the i-th of ``count``
    global batches. ``variant`` sets ``train.*`` options (``variant_options``; ``apply_speed_options`` and
    ``cross_entropy_for``, as the trainer). With a ``DistributedConfig`` the accelerator is the run's
    (``make_accelerator``: DeepSpeed or FSDP) and model and optimizer are prepared together, as a stage's
    engine is. Returns ``(step, device, precision, optimizer)``."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from cpt.distributed import DistributedConfig, make_accelerator
    from cpt.model import apply_speed_options, cross_entropy_for
    from cpt.optim import build_optimizer
    from cpt.trainer import train_step

    device, precision = device_and_dtype(precision)
    model, train = build(config)
    for key, value in variant_options(variant).items():
        setattr(train, key, value)
    distributed = distributed or DistributedConfig()
    if distributed.engine == "ddp":
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    else:
        accelerator = make_accelerator(SimpleNamespace(distributed=distributed, train=train), precision, ROOT)
    apply_speed_options(model, train)
    cross_entropy = cross_entropy_for(train, device, distributed.shards_weights)
    if distributed.engine == "ddp":
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(build_optimizer(model, train, LR))
    else:
        model, optimizer = accelerator.prepare(model, build_optimizer(model, train, LR))
    data = batches(config, count)
    rows = train.micro_batch * train.grad_accum

    def step(i: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = LR
        window = data[i * rows:(i + 1) * rows]
        micro = [m.to(device) for m in window.split(train.micro_batch)]
        return train_step(model, optimizer, micro, accelerator, train.grad_clip, cross_entropy=cross_entropy)
    step.model = model  # for measurements beyond the step (gpu_check's evaluation and checkpoint)
    return step, device, precision, optimizer


def worker_cpt(config: str, precision: str, steps: int, warmup: int, variant: str = "", distributed=None) -> dict:
    """Time ``steps`` calls of ``cpt.trainer.train_step`` after ``warmup``, as the trainer's loop makes them."""
    from cpt.distributed import DistributedConfig
    from cpt.kernels import resolve_loss

    step, device, precision, optimizer = cpt_steps(config, precision, steps + warmup, variant, distributed)
    shards_weights = (distributed or DistributedConfig()).shards_weights
    loss_kind = resolve_loss(variant_options(variant)["loss"], device, shards_weights)
    times, last = [], time.perf_counter()
    for i in range(steps + warmup):
        metrics = step(i)
        sync(device)
        now = time.perf_counter()
        if i >= warmup:
            times.append(now - last)
        last = now
    return {"times": times, "loss": metrics["loss"], "precision": precision, "device": str(device),
            "optimizer": optimizer_setting(optimizer), "loss_kind": loss_kind, **cuda_memory(device)}


def optimizer_setting(optimizer) -> str:
    defaults = getattr(optimizer, "optimizer", optimizer).defaults
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"


def cuda_memory(device) -> dict:
    import torch

    return {"cuda_max_allocated": torch.cuda.max_memory_allocated()} if device.type == "cuda" else {}


def worker_hf(config: str, precision: str, steps: int, warmup: int, optim: str, variant: str = "") -> dict:
    """Time ``steps`` optimizer steps of ``transformers.Trainer`` after ``warmup`` on the same model and data;
    ``variant`` compile or checkpointing sets the Trainer's own ``torch_compile`` / ``gradient_checkpointing``."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device, precision = device_and_dtype(precision)
    model, train = build(config)
    data = batches(config, steps + warmup)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            # labels switch the model's loss on; shift_labels (already shifted) is what it is computed on.
            return {"input_ids": data[i, :-1], "labels": data[i, 1:], "shift_labels": data[i, 1:]}

    times: list[float] = []

    class Clock(TrainerCallback):
        last = None

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            now = time.perf_counter()
            if self.last is not None and state.global_step > warmup:
                times.append(now - self.last)
            self.last = now

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps + warmup, per_device_train_batch_size=train.micro_batch,
            gradient_accumulation_steps=train.grad_accum, learning_rate=LR, lr_scheduler_type="constant",
            weight_decay=train.weight_decay, adam_beta1=train.beta1, adam_beta2=train.beta2,
            adam_epsilon=train.eps, max_grad_norm=train.grad_clip, optim=optim, bf16=precision == "bf16",
            fp16=precision == "fp16", use_cpu=device.type == "cpu", logging_steps=10, save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            torch_compile=variant_options(variant)["compile"],
            gradient_checkpointing=variant_options(variant)["activation_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
            dataloader_drop_last=True, remove_unused_columns=False, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Clock()])
        result = trainer.train()
    return {"times": times, "loss": result.training_loss, "precision": precision, "device": str(device),
            "optimizer": optim, **cuda_memory(device)}


def worker_extras(steps: int, warmup: int) -> dict:
    """The demo's extras, timed against the bare step: batch draws, eval, metrics rows, checkpoints (demo
    defaults)."""
    import numpy as np
    from accelerate import Accelerator

    from cpt.checkpoint import rng_state, save_checkpoint
    from cpt.data.tokenizer import load_tokenizer
    from cpt.evaluate import EvalSet, evaluate
    from cpt.metrics import MetricsLogger, WandbConfig
    from cpt.recipe import load_recipe
    from cpt.runner import resolve_precision
    from cpt.optim import build_optimizer
    from cpt.trainer import reuses_end_eval, train_step

    recipe, base_dir = load_recipe(ROOT / "recipes" / "demo.yaml")
    device, _ = device_and_dtype("no")
    precision = resolve_precision(recipe.train.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    model, train = build("demo")
    model = accelerator.prepare(model)
    optimizer = accelerator.prepare(build_optimizer(model, train, LR))
    data = batches("demo", steps + warmup)
    step_times, log_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        metrics = MetricsLogger(Path(tmp), WandbConfig(), "bench", {})
        for step in range(steps + warmup):
            start = time.perf_counter()
            out = train_step(model, optimizer, [data[step * 8:(step + 1) * 8].to(device)], accelerator,
                             train.grad_clip)
            sync(device)
            middle = time.perf_counter()
            metrics.log({"kind": "train", "step": step, "stage": "pretrain", "stage_step": step, **out, "lr": LR,
                         "tokens": step * 2048, "tokens_per_s": 2048 / (middle - start)})
            if step >= warmup:
                step_times.append(middle - start)
                log_times.append(time.perf_counter() - middle)
        metrics.close()
        generator = np.random.default_rng(2)
        sets = [EvalSet(name, name, generator.integers(0, 4096, (recipe.eval.max_tokens // train.seq_len,
                                                                 train.seq_len + 1)), 4.0, name)
                for name in recipe.eval.resolved]
        eval_times = []
        for _ in range(3):
            start = time.perf_counter()
            for eval_set in sets:
                evaluate(model, eval_set, recipe.eval.batch_size, accelerator)
            sync(device)
            eval_times.append(time.perf_counter() - start)
        tokenizer = load_tokenizer(TOKENIZER)
        ckpt_times, ckpt_bytes = [], 0
        for i in range(3):
            target = Path(tmp) / "checkpoints" / f"step-{i}"
            train_state = {"optimizer": optimizer.state_dict(), "counters": {}, "data": {}, "rng": rng_state()}
            start = time.perf_counter()
            save_checkpoint(target, accelerator.unwrap_model(model), tokenizer, train_state, {"run": "bench"},
                            recipe.to_dict())
            ckpt_times.append(time.perf_counter() - start)
            ckpt_bytes = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    stage_steps = [recipe.train.stage_steps(s) for s in recipe.stages]
    draw_times = time_batch_draws(recipe, base_dir, stage_steps, accelerator)
    # A stage's start evaluation repeats the previous stage's end when the weights are the same (not computed).
    evals = (sum(2 + sum(recipe.eval.due(t, n) for t in range(1, n)) for n in stage_steps)
             - sum(reuses_end_eval(a, b, per_stage_engine=False) for a, b in zip(recipe.stages, recipe.stages[1:])))
    return {"precision": precision, "step": statistics.median(step_times), "log": statistics.median(log_times),
            "eval": statistics.median(eval_times), "evals": evals, "checkpoint": statistics.median(ckpt_times),
            "checkpoint_bytes": ckpt_bytes, "checkpoints": len(stage_steps), "steps": sum(stage_steps),
            "draw": statistics.fmean(draw_times),
            "eval_every": recipe.eval.every, "eval_tokens": recipe.eval.max_tokens}


def time_batch_draws(recipe, base_dir: Path, stage_steps: list[int], accelerator) -> list[float]:
    """Seconds to draw each step's batch of the demo run (its mixtures and replay, from its prepared shards,
    as the trainer draws them: ``draw_micro_batches``), every step of every stage."""
    from cpt.data.prepare import prepare
    from cpt.data.stream import DataStream
    from cpt.runner import data_dir
    from cpt.data.batches import draw_micro_batches

    data = prepare(recipe, base_dir, data_dir(recipe, base_dir))
    train = recipe.train
    stream = DataStream(data.corpora, recipe.stages, stage_steps, train.seq_len, train.micro_batch * train.grad_accum,
                        recipe.run.seed, recipe.data.max_epochs, recipe.data.replay_buffer_size)
    times = []
    for index, (stage, steps) in enumerate(zip(recipe.stages, stage_steps)):
        stream.start_stage(index)
        for _ in range(steps):
            start = time.perf_counter()
            draw_micro_batches(stream, stage, train.grad_accum, accelerator)
            times.append(time.perf_counter() - start)
    return times


def worker_prepare(corpus: str, workers: int) -> dict:
    """Tokenize one demo corpus with ``write_shard`` as ``cpt prepare --workers WORKERS`` does; tokens,
    seconds, and a digest of the token files."""
    from cpt.data.shards import write_shard
    from cpt.data.sources import CorpusConfig, iter_documents
    from cpt.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    config = CorpusConfig(source=corpus)
    docs = list(iter_documents(config, ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shard = write_shard(corpus, Path(tmp) / "shard", docs, tokenizer, "bench", {}, config.val_fraction,
                            config.val_max_docs, config.split_seed, workers=workers)
        seconds = time.perf_counter() - start
        tokens = len(shard.train.tokens) + len(shard.val.tokens)
        size = shard.train.bytes + shard.val.bytes
        digest = hashlib.sha256(b"".join((shard.path / f"{split}.bin").read_bytes() for split in ("train", "val")))
    return {"tokens": tokens, "bytes": size, "documents": len(docs), "seconds": seconds,
            "sha256": digest.hexdigest()}


def worker_adamw(config: str, rounds: int) -> dict:
    """Seconds per ``optimizer.step()`` of AdamW's three torch implementations on ``config``'s parameters, the
    implementations taking turns over ``rounds`` rounds (median); the before/after of ``build_optimizer``."""
    import torch

    from cpt.optim import build_optimizer

    model, train = build(config)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = build_optimizer(model, train, LR).param_groups
    options = dict(lr=LR, betas=(train.beta1, train.beta2), eps=train.eps)
    kinds = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    optimizers = {k: torch.optim.AdamW([{**g, "params": g["params"]} for g in groups], **options, **kw)
                  for k, kw in kinds.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds + 1):
        for kind, optimizer in optimizers.items():
            for _ in range(3):
                start = time.perf_counter()
                optimizer.step()
                if r > 0:
                    times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run_worker(args: list[str]) -> dict:
    """Run this script as a worker process; its JSON result, with its peak RSS from ``os.wait4``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--worker-out", out.name, *args], cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"worker {' '.join(args)} failed with exit status {code}")
        return {**json.loads(Path(out.name).read_text()), "peak_rss": usage.ru_maxrss * 1024}


def compare(config: str, precision: str, rounds: int, steps: int, warmup: int, optim: str, variant: str = "") -> dict:
    """Alternate cpt and HF worker processes for ``rounds`` rounds; the step times and peaks of each side."""
    sides = {"cpt": [], "hf": []}
    results: dict = {"cpt": {}, "hf": {}, "peak_flops": []}
    for r in range(rounds):
        order = ["cpt", "hf"] if r % 2 == 0 else ["hf", "cpt"]
        for side in order:
            extra = (["--optim", optim] if side == "hf" else []) + (["--variant", variant] if variant else [])
            out = run_worker(["--worker", side, "--config", config, "--precision", precision, "--steps", str(steps),
                              "--warmup", str(warmup), *extra])
            sides[side].extend(out.pop("times"))
            results[side]["peak_rss"] = max(results[side].get("peak_rss", 0), out.pop("peak_rss"))
            results[side].update(out)
            log(f"  round {r + 1} {side}: median {statistics.median(sides[side][-steps:]):.3f} s/step")
        results["peak_flops"].append(peak_matmul(precision, 4096 if config != "demo" else 2048, 3))
    model, train = build(config)
    tokens = train.micro_batch * train.grad_accum * train.seq_len
    flops = model_flops_per_token(model, train.seq_len)
    peak = statistics.median(results["peak_flops"])
    for side, times in sides.items():
        seconds = statistics.median(times)
        results[side].update(step_s=seconds, tokens_per_s=tokens / seconds, mfu=flops * tokens / seconds / peak,
                             timed_steps=len(times), times=times)
    results.update(ratio=results["cpt"]["tokens_per_s"] / results["hf"]["tokens_per_s"], peak=peak,
                   flops_per_token=flops, params=sum(p.numel() for p in model.parameters()),
                   tokens_per_step=tokens, train=dict(seq_len=train.seq_len, micro_batch=train.micro_batch,
                                                      grad_accum=train.grad_accum))
    return results


def measure_prepare(rounds: int) -> dict:
    """Each demo corpus tokenized with 1 and 2 workers, one process per run, the two taking turns over
    ``rounds`` rounds; per corpus and worker count the counts and the median seconds."""
    results: dict = {}
    for corpus in PREPARE_CORPORA:
        runs: dict[str, list[dict]] = {w: [] for w in PREPARE_WORKERS}
        for r in range(rounds):
            for workers in PREPARE_WORKERS if r % 2 == 0 else PREPARE_WORKERS[::-1]:
                runs[workers].append(run_worker(["--worker", "prepare", "--corpus", corpus, "--workers", workers]))
                log(f"  prepare {corpus}, round {r + 1}, {workers} worker(s): {runs[workers][-1]['seconds']:.2f} s")
        if len({o["sha256"] for out in runs.values() for o in out}) != 1:
            raise SystemExit(f"{corpus}: the token files differ between worker counts")
        results[corpus] = {w: {**out[0], "seconds": statistics.median(o["seconds"] for o in out),
                               "runs": [o["seconds"] for o in out]} for w, out in runs.items()}
    return results


def hf_optim_for_cpt(config: str) -> str:
    """The HF ``optim`` matching what ``build_optimizer`` builds (fused or not)."""
    from cpt.optim import build_optimizer

    model, train = build(config)
    return "adamw_torch_fused" if optimizer_setting(build_optimizer(model, train, LR)) == "fused" else "adamw_torch"


def machine() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    info = benchmarks_md.machine(torch=torch.__version__, transformers=transformers.__version__,
                                 accelerate=accelerate.__version__, threads=str(torch.get_num_threads()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def code_version() -> str:
    return benchmarks_md.code_version("cpt/trainer.py", "cpt/model.py")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def format_section(results: dict, info: dict) -> str:
    m = info["machine"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    lines = [
        f"Command: `{info['command']}` ({info['date']}). Machine: {m['nproc']} CPUs ({m['cpu']}){gpu}, torch "
        f"{m['torch']} ({m['threads']} threads), transformers {m['transformers']}, accelerate {m['accelerate']}, "
        f"Python {m['python']}. Code: {info['code']}. Wall time {info['wall_s'] / 60:.1f} min. Load average "
        f"(1/5/15 min) {info['load'][0]} at the start and {info['load'][1]} at the end; the machine is shared with "
        "other jobs, so absolute numbers are noisy; the two sides alternate (one process per side per round) so "
        "load falls on both alike.",
        "",
        "Same model (scratch Llama from `cpt.model.build_model`, same initial weights), same random packed "
        "windows (`[B, T+1]` token ids; both sides predict the same B x T targets, HF via `shift_labels`), "
        "same micro-batch and accumulation, autocast precision, clipping at 1.0 and AdamW (betas 0.9/0.95, eps "
        "1e-8, weight decay 0.1 on matrices; implementation in the table). cpt = `build_optimizer` + "
        "`train_step` under Accelerate in a plain loop; HF = `transformers.Trainer` (no eval, no saving, logging "
        "every 10 steps). Step time = end of one optimizer step to the end of the next, median over "
        f"{info['rounds']} rounds x {info['steps']} steps per side after {info['warmup']} warm-up steps per "
        "process. MFU = model FLOPs/s (6 x matmul weights incl. the LM head + 12 x layers x T x hidden per token) "
        "over the peak of a square matmul in the same dtype, timed between rounds. Peak RSS = the worker "
        "process's `ru_maxrss` (Python, torch and transformers included).",
        "",
        "| model | params | batch (micro x seq x accum) | precision | AdamW | cpt tokens/s | HF Trainer tokens/s "
        "| cpt / HF | cpt MFU | HF MFU | peak matmul TFLOP/s | cpt peak RSS MiB | HF peak RSS MiB |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["compare"].items():
        t = r["train"]
        memory = ""
        if "cuda_max_allocated" in r["cpt"]:
            memory = f" (CUDA max allocated {mib(r['cpt']['cuda_max_allocated'])} / {mib(r['hf']['cuda_max_allocated'])})"
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f} M | {t['micro_batch']} x {t['seq_len']} x {t['grad_accum']} "
            f"| {r['cpt']['precision']} | {r['cpt']['optimizer']} / {r['hf']['optimizer']} "
            f"| {r['cpt']['tokens_per_s']:,.0f} | {r['hf']['tokens_per_s']:,.0f} | **{r['ratio']:.2f}x** "
            f"| {100 * r['cpt']['mfu']:.1f}% | {100 * r['hf']['mfu']:.1f}% | {r['peak'] / 1e12:.2f} "
            f"| {mib(r['cpt']['peak_rss'])} | {mib(r['hf']['peak_rss'])}{memory} |")
    arch = CONFIGS["llama-110m"][0]
    lines += ["", f"llama-110m: {arch['layers']} layers, hidden {arch['hidden']}, {arch['heads']} heads, MLP "
                  f"{arch['intermediate']}, vocab {CONFIGS['llama-110m'][1]:,}, tied embeddings. demo: the demo "
                  "recipe's model (4 layers, hidden 128, 4 heads, MLP 384, vocab 4,096). Rows marked +compile / "
                  "+checkpointing set that option on both sides: cpt `train.compile` / `train.activation_checkpointing` "
                  "(`cpt.model.apply_speed_options`), HF `torch_compile` / `gradient_checkpointing` (non-reentrant); "
                  "compilation happens in the warm-up steps."]
    if results.get("adamw"):
        lines += ["", "AdamW step alone (`optimizer.step()` on random gradients, the three torch implementations "
                      "taking turns in one process, median; `build_optimizer` now picks fused, it used torch's "
                      "default, the for-loop on CPU):", "",
                  "| model | for-loop ms (before) | foreach ms | fused ms (after) | for-loop / fused |",
                  "|---|---:|---:|---:|---:|"]
        for name, a in results["adamw"].items():
            lines.append(f"| {name} | {1000 * a['for-loop']:.1f} | {1000 * a['foreach']:.1f} | {1000 * a['fused']:.1f} "
                         f"| {a['for-loop'] / a['fused']:.1f}x |")
    e = results.get("extras")
    if e:
        per_step = {"batches": e["draw"], "evaluation": e["eval"] * e["evals"] / e["steps"], "metrics row": e["log"],
                    "checkpoints": e["checkpoint"] * e["checkpoints"] / e["steps"]}
        total = sum(per_step.values())
        lines += ["", f"Extras at the demo's defaults (precision {e['precision']}, what `mixed_precision: auto` "
                      f"resolves to here; {e['steps']} steps; bare `train_step` {1000 * e['step']:.1f} ms median), amortised per step:",
                  "", "| extra | cost | per step (ms) | % of the bare step |", "|---|---|---:|---:|"]
        detail = {"batches": f"each step's batch drawn from the demo's mixtures, replay included (mean over "
                             f"{e['steps']} steps), split for the rank and made tensors",
                  "evaluation": f"{e['evals']} evaluations of 2 sets x {e['eval_tokens']:,} tokens, "
                                f"{e['eval']:.2f} s each",
                  "metrics row": "one `metrics.jsonl` row per step (JSON + flush)",
                  "checkpoints": f"{e['checkpoints']} (one per stage end), {e['checkpoint']:.2f} s and "
                                 f"{e['checkpoint_bytes'] / 2**20:.1f} MiB each"}
        for key, value in per_step.items():
            lines.append(f"| {key} | {detail[key]} | {1000 * value:.2f} | {100 * value / e['step']:.1f}% |")
        lines.append(f"| **total** | | {1000 * total:.2f} | **{100 * total / e['step']:.1f}%** |")
        lines += ["", "Self-distillation is off at the demo's defaults; its cost (a teacher forward per micro-batch) "
                      "is under \"Anti-forgetting methods on the demo\" (`scripts/bench_methods.py`)."]
    if results.get("prepare"):
        lines += ["", *format_prepare(results["prepare"], info["rounds"])]
    ratios = {name: r["ratio"] for name, r in results["compare"].items()}
    lines += ["", "Targets (issue 9):", "",
              "- cpt >= 1.1x the HF Trainer's tokens/s on this CPU: "
              + ("**met**" if all(v >= 1.1 for v in ratios.values()) else "**not met**") + " ("
              + ", ".join(f"{name} {v:.2f}x" for name, v in ratios.items()) + ")."]
    if e:
        share = total / e["step"]
        lines.append(f"- extras <= 5% of step time at the demo's defaults: **{'met' if share <= 0.05 else 'not met'}** "
                     f"({100 * share:.1f}%; evaluation alone {100 * per_step['evaluation'] / e['step']:.1f}%).")
    if info.get("notes"):
        lines += ["", *info["notes"]]
    return "\n".join(lines) + "\n"


def format_prepare(p: dict, rounds: int) -> list[str]:
    """The data-preparation paragraph and table."""
    from cpt.data.shards import BATCH, WORKER_BATCH

    lines = [f"Data preparation (`write_shard` as `cpt prepare --workers N` runs it, the demo's sentencepiece "
             f"tokenizer, vocab 4,096; median of {rounds} run{'s' * (rounds > 1)} per cell, one process each, 1 and "
             f"2 workers taking turns). With 1 worker the main process tokenizes batches of {BATCH} documents "
             "on the tokenizer's own thread pool at its default (a thread per core); with 2, two forked processes "
             f"tokenize batches of {WORKER_BATCH} on one thread each while the main process splits and writes. "
             "Every run's token files were byte-identical (sha256):", "",
             "| corpus | documents | tokens | MB | tokens/s, 1 worker | tokens/s, 2 workers | 2 / 1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for corpus, by_workers in p.items():
        one = by_workers["1"]
        speed = {w: by_workers[w]["tokens"] / by_workers[w]["seconds"] for w in PREPARE_WORKERS}
        lines.append(f"| {corpus} | {one['documents']:,} | {one['tokens']:,} | {one['bytes'] / 1e6:.1f} | "
                     f"{speed['1']:,.0f} | {speed['2']:,.0f} | {speed['2'] / speed['1']:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 3 steps, demo model only")
    parser.add_argument("--configs", default="demo,llama-110m", help=f"comma-separated of: {', '.join(CONFIGS)}")
    parser.add_argument("--variants", default="demo:compile,llama-110m:checkpointing",
                        help="CONFIG:compile|checkpointing pairs also compared, both sides with that option "
                             "('' for none)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "no"],
                        help="autocast precision (auto: bf16 on a GPU or CPU that supports it, else fp32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="timed steps per side per round (default: 10 demo, 3 others)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-extras", action="store_true")
    parser.add_argument("--no-prepare", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_train.json")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    parser.add_argument("--render", type=Path, help="rewrite the section from a JSON this script wrote, measuring nothing")
    # worker mode (one side in its own process)
    parser.add_argument("--worker", choices=["cpt", "hf", "extras", "prepare", "adamw"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--optim", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        steps = args.steps or 10
        out = {"cpt": lambda: worker_cpt(args.config, args.precision, steps, args.warmup, args.variant),
               "hf": lambda: worker_hf(args.config, args.precision, steps, args.warmup, args.optim, args.variant),
               "extras": lambda: worker_extras(steps, args.warmup),
               "prepare": lambda: worker_prepare(args.corpus, args.workers),
               "adamw": lambda: worker_adamw(args.config, args.rounds)}[args.worker]()
        Path(args.worker_out).write_text(json.dumps(out))
        return
    if args.render:
        saved = json.loads(args.render.read_text())
        body = format_section(saved, saved.pop("info"))
        print(f"{HEADING}\n\n{body}")
        if not args.no_write:
            write_section(args.out, HEADING, body)
        return
    configs = ["demo"] if args.quick else args.configs.split(",")
    rounds = 2 if args.quick else args.rounds
    started, load_start = time.time(), os.getloadavg()
    results: dict = {"compare": {}}
    variants = [] if args.quick or not args.variants else [tuple(v.split(":")) for v in args.variants.split(",")]
    for config, variant in [(c, "") for c in configs] + variants:
        steps = args.steps or (3 if args.quick else 10 if config == "demo" else 3)
        optim = hf_optim_for_cpt(config)
        name = f"{config} +{variant}" if variant else config
        log(f"{name}: {rounds} rounds x {steps} steps per side (HF optim {optim})")
        results["compare"][name] = compare(config, args.precision, rounds, steps, args.warmup, optim, variant)
        r = results["compare"][name]
        log(f"  cpt {r['cpt']['tokens_per_s']:,.0f} tok/s, HF {r['hf']['tokens_per_s']:,.0f} tok/s, "
            f"ratio {r['ratio']:.2f}")
    results["adamw"] = {}
    for config in configs:
        log(f"AdamW implementations on {config}")
        results["adamw"][config] = run_worker(["--worker", "adamw", "--config", config, "--rounds",
                                               "2" if args.quick else "3"])
    if not args.no_extras:
        log("extras at demo defaults")
        results["extras"] = run_worker(["--worker", "extras", "--steps", "5" if args.quick else "15",
                                        "--warmup", str(args.warmup)])
    if not args.no_prepare and TOKENIZER.is_dir():
        log("data preparation with 1 and 2 workers")
        results["prepare"] = measure_prepare(rounds)
    command = "python scripts/bench_train.py" + " ".join(
        [""] + [a for a in sys.argv[1:] if a not in ("--no-write",)])
    info = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(), "code": code_version(), "wall_s": time.time() - started, "rounds": rounds,
            "steps": "10 (demo) / 3 (others)" if args.steps is None and not args.quick else args.steps or 3,
            "warmup": args.warmup,
            "load": [" / ".join(f"{x:.2f}" for x in v) for v in (load_start, os.getloadavg())]}
    if not TOKENIZER.is_dir():
        info["notes"] = [f"Data preparation not measured: no tokenizer at {TOKENIZER} (run `cpt prepare "
                         "recipes/demo.yaml`)."]
    body = format_section(results, info)
    print(f"{HEADING}\n\n{body}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, **results}, indent=1) + "\n")
    log(f"wrote {args.json} ({info['wall_s']:.0f} s)")
    if not args.no_write and not args.quick:
        write_section(args.out, HEADING, body)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
