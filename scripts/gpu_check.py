"""One prepared GPU check (issue 21): every number the GPU targets need, from one command, in under 8 minutes.

On one CUDA GPU, with models built from config (random init, nothing downloaded), it measures:

- ``peak``: the dense bf16 peak, a timed ``8192 x 8192`` matmul (``bench_train.peak_matmul``); MFU below is
  model FLOPs/s over this measured peak (and over the datasheet's dense bf16 peak where the GPU is known);
- ``throughput``: tokens/s and MFU of cpt's ``train_step`` on a ~1B Llama (Llama-3.2-1B's shape: 16 layers,
  hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocab 128,256, tied embeddings), bf16, at seq 2048 and 4096,
  plain, with ``train.compile``, with activation checkpointing, both, and with each ``train.loss`` kind where
  ``liger_kernel`` is installed. Model FLOPs per token = 6 x matmul weights (LM head included, embedding
  lookup not) + 12 x layers x hidden x T (attention scores and values, the full square): PaLM's count
  (Chowdhery et al. 2022, appendix B), ``bench_train.model_flops_per_token``;
- ``hf``: the same model, batch, precision and AdamW under ``transformers.Trainer``, alternated with cpt
  (one process per side per round): the ratio cpt / HF of median tokens/s;
- ``memory``: ``torch.cuda.max_memory_allocated`` for the 1B at micro-batch 1, 4 and 8 (seq 2048);
- ``engines``: DeepSpeed ZeRO-2 and FSDP on the one GPU (``cpt.distributed.make_accelerator`` as a run builds
  it; what actually wrapped the model is recorded): that they train, their tokens/s and peak memory;
- ``resume``: the real ``cpt run`` killed with SIGKILL mid-stage, then ``cpt resume``; every row after the
  checkpoint it resumed from against an uninterrupted run, both under
  ``torch.use_deterministic_algorithms(True, warn_only=True)``;
- ``overhead``: evaluation, checkpoints and metrics rows as a share of step time at the cluster recipe's
  cadence (``recipes/cluster-llama8b-zero3.yaml``: its eval sets, tokens, cadence and checkpoint interval),
  timed on the 1B at that recipe's batch shape.

Each measurement runs in its own process (peak memory and compile caches do not leak between them); a row is
written as soon as it exists (``$OUT/gpu_check.json`` and ``gpu_check.md``) and a one-line summary printed, so a
run cut short keeps what it measured. Cases that would not finish within ``--budget-s`` are reported as
skipped. Without a CUDA device it stops at once ("no CUDA device", exit code 2); ``--cpu-smoke`` instead runs
the same plumbing on CPU with a tiny model: plumbing only, none of its numbers mean anything.

Usage::

    scripts/gpu_check.sh                       # makes .venv-gpu, then runs this with --out $OUT
    python scripts/gpu_check.py --out DIR [--checks throughput,hf] [--seq 2048,4096] [--steps 6] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_train  # noqa: E402

CHECKS = ("peak", "throughput", "hf", "memory", "engines", "resume", "overhead")
LLAMA_1B = bench_train.CONFIGS["llama-1b"][0]
VOCAB_1B = bench_train.CONFIGS["llama-1b"][1]
# Micro-batch per sequence length for the throughput rows: about 8k tokens a step, in an H100's 80 GB.
MICRO_BATCH = {2048: 4, 4096: 2}
MEMORY_MICRO_BATCHES = (1, 4, 8)
# Dense bf16 datasheet peaks (no sparsity), matched against torch.cuda.get_device_name(), first match wins.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("A100", 312e12))
CLUSTER_RECIPE = ROOT / "recipes" / "cluster-llama8b-zero3.yaml"
# The resume check's pass mark where the two runs are not bit-identical (bf16 autocast, atomics in a kernel
# that has no deterministic form): nats of per-step training loss.
RESUME_TOLERANCE = 1e-3
DETERMINISTIC_CPT = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                     "from cpt.cli import main; sys.exit(main())")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")),
                   help="directory for gpu_check.json and gpu_check.md (default: $OUT, else runs/gpu_check)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.add_argument("--seq", default="2048,4096", help="sequence lengths of the throughput rows")
    p.add_argument("--steps", type=int, default=6, help="timed steps per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case (compilation happens here)")
    p.add_argument("--rounds", type=int, default=2, help="cpt/HF alternations of the hf check")
    p.add_argument("--budget-s", type=float, default=470.0, help="skip cases that would start after this")
    p.add_argument("--quick", action="store_true", help="seq 2048 only, no compile variants, 3 steps")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="PLUMBING ONLY: run the checks on CPU with a tiny model (numbers mean nothing)")
    p.add_argument("--worker", choices=["cpt", "hf", "overhead"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)  # JSON of the worker's case
    args = p.parse_args(argv)
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    try:
        args.seq = [int(s) for s in args.seq.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seq must be comma-separated integers, got {args.seq!r}")
    if args.quick:
        args.seq, args.steps = args.seq[:1], min(args.steps, 3)
    return args


def require_cuda() -> None:
    """Stop at once, in one line, where there is no GPU to check."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, or pass "
              "--cpu-smoke to test the plumbing only", file=sys.stderr)
        raise SystemExit(2)


def model_config(seq: int, micro_batch: int, grad_accum: int = 1, smoke: bool = False) -> str:
    """Register (in ``bench_train.CONFIGS``, this process) the check's model at this batch shape; its name."""
    arch, vocab = (dict(layers=2, hidden=64, heads=4, kv_heads=2), 512) if smoke else (LLAMA_1B, VOCAB_1B)
    name = f"{'smoke' if smoke else 'llama-1b'}-s{seq}-b{micro_batch}x{grad_accum}"
    bench_train.CONFIGS[name] = (arch, vocab, seq, micro_batch, grad_accum)
    return name


def flops_per_token(seq: int, smoke: bool = False) -> float:
    """PaLM's model FLOPs per token of the check's model at ``seq`` (built on the meta device: no memory)."""
    import torch

    from cpt.model import ArchConfig, ModelConfig, build_model

    arch, vocab, *_ = bench_train.CONFIGS[model_config(seq, 1, smoke=smoke)]
    with torch.device("meta"):
        model = build_model(ModelConfig(arch=ArchConfig(**arch)), bench_train.BenchTokenizer(vocab), seq, ROOT)
    return bench_train.model_flops_per_token(model, seq)


def datasheet_peak(name: str) -> float | None:
    return next((flops for key, flops in DATASHEET_BF16 if key in name), None)


# ---- output -------------------------------------------------------------------------------------------------

COLUMNS = ("check", "case", "status", "tokens_per_s", "mfu", "mfu_datasheet", "peak_mem_gib", "value", "target",
           "note")


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key.startswith("mfu") and isinstance(value, float):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table: the fixed ``COLUMNS`` first, then any other key in first-seen order."""
    extra = [k for row in rows for k in row if k not in COLUMNS]
    columns = [c for c in COLUMNS if any(c in row for row in rows)] + list(dict.fromkeys(extra))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_line(row: dict) -> str:
    """One line per row for the terminal: check, case, status and its main numbers."""
    parts = [f"{row['check']:<10} {row.get('case', ''):<34} {row['status']:<7}"]
    for key in ("tokens_per_s", "mfu", "peak_mem_gib", "value"):
        if row.get(key) is not None:
            parts.append(f"{key} {_cell(key, row[key])}")
    if row.get("note"):
        parts.append(f"({row['note']})")
    return " ".join(parts)


def write_outputs(out: Path, rows: list[dict], info: dict) -> tuple[Path, Path]:
    """``gpu_check.json`` (info + rows) and ``gpu_check.md`` (info lines + the table) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    header = [f"# GPU check{' (CPU SMOKE: plumbing only, numbers mean nothing)' if info.get('cpu_smoke') else ''}",
              "", *(f"- {k}: {v}" for k, v in info.items()), ""]
    md_path.write_text("\n".join(header) + "\n" + markdown_table(rows))
    return json_path, md_path


# ---- workers (one process per case) --------------------------------------------------------------------------

def worker(kind: str, case: dict) -> dict:
    """Run one case in this process: ``bench_train``'s cpt or HF worker, or the overhead measurement."""
    config = model_config(case["seq"], case["micro_batch"], case.get("grad_accum", 1), case["smoke"])
    precision = "no" if case["smoke"] else "bf16"
    if kind == "overhead":
        return worker_overhead(config, precision, case)
    if kind == "hf":
        return bench_train.worker_hf(config, precision, case["steps"], case["warmup"], case["optim"],
                                     case.get("variant", ""))
    distributed = None
    if case.get("engine"):
        from cpt.distributed import DistributedConfig

        distributed = DistributedConfig(**case["engine"])
    out = bench_train.worker_cpt(config, precision, case["steps"], case["warmup"], case.get("variant", ""),
                                 distributed)
    if distributed is not None:
        import torch.distributed as dist

        out["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    return out


def worker_overhead(config: str, precision: str, case: dict) -> dict:
    """Seconds of a bare training step, one evaluation of every eval set at the cluster recipe's tokens, one
    checkpoint (model + AdamW state, ``save_checkpoint``) and one metrics row, on the check's model."""
    import numpy as np

    from cpt.checkpoint import rng_state, save_checkpoint
    from cpt.evaluate import EvalSet, evaluate
    from cpt.metrics import MetricsLogger, WandbConfig

    step, device, _, optimizer = bench_train.cpt_steps(config, precision, case["steps"] + case["warmup"])
    times, out = [], {}
    for i in range(case["steps"] + case["warmup"]):
        start = time.perf_counter()
        out = step(i)
        bench_train.sync(device)
        if i >= case["warmup"]:
            times.append(time.perf_counter() - start)
    module = getattr(step.model, "module", step.model)
    vocab, seq = bench_train.CONFIGS[config][1], bench_train.CONFIGS[config][2]
    windows = np.random.default_rng(0).integers(0, vocab, (case["eval_windows"], seq + 1))
    accelerator = _accelerator(precision, device)
    start = time.perf_counter()
    for name in case["eval_sets"]:
        evaluate(module, EvalSet(name, name, windows, 4.0, name), case["eval_batch"], accelerator)
    bench_train.sync(device)
    eval_s = (time.perf_counter() - start) * case["eval_scale"]
    with tempfile.TemporaryDirectory() as tmp:
        metrics = MetricsLogger(Path(tmp), WandbConfig(), "gpu-check", {})
        start = time.perf_counter()
        metrics.log({"kind": "train", "step": 1, "stage": "s", "stage_step": 1, **out, "lr": 1e-4})
        log_s = time.perf_counter() - start
        metrics.close()
        start = time.perf_counter()
        save_checkpoint(Path(tmp) / "ckpt", module, _NoTokenizer(), {"optimizer": optimizer.state_dict(),
                        "counters": {}, "data": {}, "rng": rng_state()}, {"run": "gpu-check"}, {})
        checkpoint_s = time.perf_counter() - start
    return {"step_s": statistics.median(times), "eval_s": eval_s, "checkpoint_s": checkpoint_s, "log_s": log_s}


class _NoTokenizer:
    """The check's models have random token ids: no tokenizer files to write into the checkpoint."""

    def save_pretrained(self, path) -> None:
        pass


def _accelerator(precision: str, device):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def run_worker(kind: str, case: dict, timeout: float, env: dict | None = None) -> dict:
    """This script as a ``--worker`` process for one case; its JSON, or ``{"error": ...}`` (CUDA out of memory
    named as such) when it failed or ran past ``timeout`` seconds."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--worker", kind, "--worker-out", out.name, "--case", json.dumps(case)]
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1),
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            oom = any("OutOfMemoryError" in line or "CUDA out of memory" in line for line in tail)
            return {"error": "CUDA out of memory" if oom else (tail[-1] if tail else f"exit {proc.returncode}")[:300]}
        return json.loads(Path(out.name).read_text())


# ---- checks --------------------------------------------------------------------------------------------------

class Check:
    """The run's state: arguments, clock, rows so far; ``add`` writes the outputs and prints the summary."""

    def __init__(self, args: argparse.Namespace, info: dict):
        self.args, self.info, self.rows = args, info, []
        self.started = time.time()
        self.smoke = args.cpu_smoke
        self.peak: float | None = None
        self.datasheet = datasheet_peak(info.get("gpu", ""))

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.started)

    def add(self, row: dict) -> dict:
        row = {"check": row.pop("check"), "case": row.pop("case", ""), "status": row.pop("status", "ok"), **row}
        self.rows.append(row)
        self.info["elapsed_s"] = round(time.time() - self.started, 1)
        write_outputs(self.args.out, self.rows, self.info)
        print(summary_line(row), flush=True)
        return row

    def case(self, seq: int, micro_batch: int, **extra) -> dict:
        steps = 2 if self.smoke else self.args.steps
        warmup = 1 if self.smoke else self.args.warmup
        return {"seq": seq, "micro_batch": micro_batch, "steps": steps, "warmup": warmup, "smoke": self.smoke,
                **extra}

    def run(self, check: str, name: str, kind: str, case: dict, env: dict | None = None) -> dict | None:
        """One worker, or a skipped row when the budget is spent; an error row when it failed."""
        if self.left() < 15:
            self.add({"check": check, "case": name, "status": "skipped", "note": "time budget spent"})
            return None
        out = run_worker(kind, case, self.left(), env)
        if "error" in out:
            self.add({"check": check, "case": name, "status": "error", "note": out["error"]})
            return None
        return out

    def speed(self, out: dict, seq: int, micro_batch: int, grad_accum: int = 1) -> dict:
        tokens_per_s = micro_batch * grad_accum * seq / statistics.median(out["times"])
        flops = flops_per_token(seq, self.smoke) * tokens_per_s
        return {"tokens_per_s": tokens_per_s, "mfu": flops / self.peak if self.peak else None,
                "mfu_datasheet": flops / self.datasheet if self.datasheet else None,
                "peak_mem_gib": out["cuda_max_allocated"] / 2**30 if "cuda_max_allocated" in out else None,
                "loss": round(out["loss"], 4)}


def check_peak(c: Check) -> None:
    n, repeats = (512, 3) if c.smoke else (8192, 10)
    c.peak = bench_train.peak_matmul("no" if c.smoke else "bf16", n, repeats)
    if not c.smoke:
        import torch

        torch.cuda.empty_cache()  # the workers that follow get the GPU's memory, less this process's context
    c.add({"check": "peak", "case": f"{'fp32' if c.smoke else 'bf16'} matmul {n}x{n}", "value": c.peak / 1e12,
           "note": "TFLOP/s measured" + (f"; datasheet dense bf16 {c.datasheet / 1e12:.0f}" if c.datasheet else "")})


def check_throughput(c: Check) -> None:
    seqs = [64] if c.smoke else c.args.seq
    variants = ["", "checkpointing"] if c.smoke or c.args.quick else ["", "compile", "checkpointing",
                                                                      "compile+checkpointing"]
    if importlib.util.find_spec("liger_kernel") and not c.smoke:
        variants += ["chunked", "fused_linear"]
    # The MFU target is at the longest sequence: its rows first, so they exist if the budget runs out.
    for seq in sorted(seqs, reverse=True):
        micro = 2 if c.smoke else MICRO_BATCH.get(seq, max(1, 8192 // seq))
        for variant in variants:
            name = f"seq {seq} x {micro} {variant or 'plain'}"
            out = c.run("throughput", name, "cpt", c.case(seq, micro, variant=variant))
            if out is None:
                continue
            row = {"check": "throughput", "case": name, **c.speed(out, seq, micro), "loss_kind": out["loss_kind"]}
            if seq >= 4096 and not c.smoke:
                row["target"] = "MFU >= 40%"
                row["status"] = "ok" if row["mfu"] and row["mfu"] >= 0.40 else "below"
            c.add(row)


def check_hf(c: Check) -> None:
    seq, micro = (64, 2) if c.smoke else (2048, MICRO_BATCH[2048])
    optim = "adamw_torch_fused"  # what build_optimizer builds on CUDA and CPU
    times: dict[str, list[float]] = {"cpt": [], "hf": []}
    outs: dict[str, dict] = {}
    for r in range(1 if c.smoke else c.args.rounds):
        for side in ("cpt", "hf") if r % 2 == 0 else ("hf", "cpt"):
            out = c.run("hf", f"round {r + 1} {side}", side, c.case(seq, micro, optim=optim))
            if out is None:
                return
            times[side] += out["times"]
            outs[side] = out
    speed = {side: c.speed({**outs[side], "times": times[side]}, seq, micro) for side in times}
    ratio = speed["cpt"]["tokens_per_s"] / speed["hf"]["tokens_per_s"]
    speed["cpt"]["loss_kind"] = outs["cpt"]["loss_kind"]  # HF computes its own loss on the logits
    for side in ("cpt", "hf"):
        c.add({"check": "hf", "case": f"seq {seq} x {micro} {side}", **speed[side]})
    c.add({"check": "hf", "case": "cpt / HF Trainer tokens/s", "value": ratio, "target": ">= 1.1",
           "status": "ok" if ratio >= 1.1 or c.smoke else "below"})


def check_memory(c: Check) -> None:
    seq = 64 if c.smoke else 2048
    for micro in (1, 2) if c.smoke else MEMORY_MICRO_BATCHES:
        name = f"seq {seq} micro-batch {micro}"
        out = c.run("memory", name, "cpt", c.case(seq, micro))
        if out is not None:
            row = c.speed(out, seq, micro)
            c.add({"check": "memory", "case": name, "peak_mem_gib": row["peak_mem_gib"],
                   "tokens_per_s": row["tokens_per_s"], "note": None if not c.smoke else "no CUDA memory on CPU"})


def check_engines(c: Check) -> None:
    if c.smoke:
        c.add({"check": "engines", "case": "ZeRO-2, FSDP", "status": "skipped",
               "note": "--cpu-smoke: DeepSpeed and FSDP are tested on CPU by tests/test_distributed.py"})
        return
    seq, micro = 2048, MICRO_BATCH[2048]
    # One process, started as torchrun would start rank 0 of 1, so that DeepSpeed and FSDP find a process group.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533"}
    for name, engine in (("DeepSpeed ZeRO-2", {"engine": "deepspeed", "zero_stage": 2}),
                         ("FSDP", {"engine": "fsdp"})):
        out = c.run("engines", name, "cpt", c.case(seq, micro, engine=engine), env)
        if out is not None:
            c.add({"check": "engines", "case": f"{name} seq {seq} x {micro}", **c.speed(out, seq, micro),
                   "note": f"world size {out.get('world_size')}"})


def check_overhead(c: Check) -> None:
    """Eval, checkpoint and metrics cost per step at the cluster recipe's cadence, over its bare step time."""
    from cpt.recipe import load_recipe

    recipe, _ = load_recipe(CLUSTER_RECIPE)
    train, ev = recipe.train, recipe.eval
    stage_steps = [train.stage_steps(s) for s in recipe.stages]
    steps = sum(stage_steps)
    # As the loop does: stage start and end always evaluated (a start on the previous end's weights reuses that
    # evaluation), checkpoints every `every` global steps within a stage and at each stage's end.
    evals = sum(2 + sum(ev.due(t, n) for t in range(1, n)) for n in stage_steps) - (len(stage_steps) - 1)
    every, checkpoints, global_step = recipe.checkpoint.every, 0, 0
    for n in stage_steps:
        for t in range(1, n + 1):
            global_step += 1
            checkpoints += t == n or bool(every and global_step % every == 0)
    seq, micro, accum = (64, 2, 2) if c.smoke else (train.seq_len, train.micro_batch, train.grad_accum)
    # Eval windows: the recipe's tokens per set, timed on an eighth of them and scaled (a GPU's eval is linear in it).
    windows_full = ev.max_tokens // train.seq_len
    windows = 2 if c.smoke else max(1, windows_full // 8)
    case = c.case(seq, micro, grad_accum=accum, eval_sets=list(ev.resolved), eval_batch=ev.batch_size,
                  eval_windows=windows, eval_scale=1.0 if c.smoke else windows_full / windows)
    out = c.run("overhead", "cluster cadence", "overhead", case)
    if out is None:
        return
    per_step = {"eval": out["eval_s"] * evals / steps, "checkpoint": out["checkpoint_s"] * checkpoints / steps,
                "metrics": out["log_s"]}
    share = sum(per_step.values()) / out["step_s"]
    for key, value in per_step.items():
        c.add({"check": "overhead", "case": key, "value": value / out["step_s"],
               "note": f"{value * 1000:.1f} ms per step"})
    c.add({"check": "overhead", "case": "eval + checkpoint + metrics", "value": share, "target": "<= 0.05",
           "status": "ok" if share <= 0.05 or c.smoke else "above",
           "note": f"{evals} evals, {checkpoints} checkpoints over {steps} steps; bare step {out['step_s']:.3f} s "
                   f"(seq {seq} x {micro} x {accum}); eval {out['eval_s']:.1f} s, checkpoint "
                   f"{out['checkpoint_s']:.1f} s"})


def resume_recipe(root: Path, run_dir: Path, smoke: bool) -> dict:
    """A 2-stage recipe on built-in text (a few hundred KB), checkpoints every 10 steps."""
    arch = {"layers": 2, "hidden": 32, "heads": 2} if smoke else {"layers": 4, "hidden": 256, "heads": 4}
    return {"name": "gpu-check-resume", "model": {"init": "scratch", "arch": arch},
            "tokenizer": {"train": {"vocab_size": 512}},
            "corpora": {"english": {"source": "kjv", "max_docs": 40, "val_fraction": 0.1},
                        "code": {"source": "python-stdlib", "max_docs": 40, "val_fraction": 0.1}},
            "eval": {"every": 20, "max_tokens": 2048, "batch_size": 4,
                     "sets": {"upstream": "english", "downstream": "code"}},
            "stages": [{"name": "pretrain", "steps": 30, "mixture": {"english": 1.0},
                        "schedule": {"peak_lr": 3e-3, "warmup_steps": 3}},
                       {"name": "cpt", "steps": 120 if not smoke else 30, "mixture": {"code": 0.9, "english": 0.1},
                        "schedule": {"peak_lr": 3e-3, "warmup_steps": 3}}],
            "train": {"seq_len": 64 if smoke else 256, "micro_batch": 4 if smoke else 16, "grad_accum": 2},
            "checkpoint": {"every": 10, "keep_last": 3},
            "run": {"dir": str(run_dir), "seed": 0, "data_dir": str(root / "data")}}


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def compare_resumed(full: list[dict], resumed: list[dict], after_step: int) -> dict:
    """Train rows after ``after_step``: are they the same steps, bit-identical, and how far apart in loss."""
    pick = lambda rows: {r["step"]: r for r in rows if r["kind"] == "train" and r["step"] > after_step}  # noqa: E731
    a, b = pick(full), pick(resumed)
    if not a or sorted(a) != sorted(b):
        return {"same_steps": False, "bit_identical": False, "max_loss_diff": None, "rows": len(b)}
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in a]
    identical = all(a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in a)
    return {"same_steps": True, "bit_identical": identical, "max_loss_diff": max(diffs), "rows": len(a)}


def check_resume(c: Check) -> None:
    """``cpt run`` to the end; the same recipe killed with SIGKILL mid-stage and ``cpt resume``d; compare."""
    import yaml

    if c.left() < 60:
        c.add({"check": "resume", "case": "kill -9 + cpt resume", "status": "skipped", "note": "time budget spent"})
        return
    root = c.args.out / "resume"
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cpt = [sys.executable, "-c", DETERMINISTIC_CPT]
    runs = {}
    for name in ("full", "killed"):
        runs[name] = root / name
        (root / f"{name}.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(resume_recipe(root, runs[name], c.smoke)))
    logs = open(root / "log.txt", "w")
    full = subprocess.run([*cpt, "run", str(root / "full.yaml"), "--overwrite"], env=env, stdout=logs, stderr=logs,
                          timeout=max(c.left(), 1))
    if full.returncode != 0:
        c.add({"check": "resume", "case": "uninterrupted run", "status": "error", "note": f"see {root / 'log.txt'}"})
        return
    kill_after = 30 + 25  # mid-way through the second stage, past its checkpoint at global step 50
    proc = subprocess.Popen([*cpt, "run", str(root / "killed.yaml"), "--overwrite"], env=env, stdout=logs, stderr=logs)
    deadline = time.time() + min(c.left(), 300)
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in _rows(runs["killed"]) if r["kind"] == "train"]
        if steps and steps[-1] >= kill_after:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        c.add({"check": "resume", "case": "kill -9 + cpt resume", "status": "error",
               "note": "the run ended before it could be killed; raise the second stage's steps"})
        return
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [r["step"] for r in _rows(runs["killed"]) if r["kind"] == "train"][-1]
    from cpt.checkpoint import latest_intact

    found = latest_intact(runs["killed"])  # what `cpt resume` starts from
    from_step = found[0]["global_step"] if found else 0
    resumed = subprocess.run([*cpt, "resume", str(runs["killed"])], env=env, stdout=logs, stderr=logs,
                             timeout=max(c.left(), 1))
    result = compare_resumed(_rows(runs["full"]), _rows(runs["killed"]), from_step)
    ok = resumed.returncode == 0 and result["same_steps"] and (
        result["bit_identical"] or result["max_loss_diff"] <= RESUME_TOLERANCE)
    c.add({"check": "resume", "case": "kill -9 + cpt resume", "status": "ok" if ok else "fail",
           "value": result["max_loss_diff"], "target": f"bit-identical, or max |loss diff| <= {RESUME_TOLERANCE}",
           "note": f"killed at step {killed_at}, resumed from {from_step}; {result['rows']} rows compared; "
                   f"bit-identical: {result['bit_identical']}; deterministic algorithms (warn_only)"})


RUNNERS = {"peak": check_peak, "throughput": check_throughput, "hf": check_hf, "memory": check_memory,
           "engines": check_engines, "resume": check_resume, "overhead": check_overhead}


def machine_info(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    info = {"command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_smoke": args.cpu_smoke,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "code": bench_train.benchmarks_md.code_version("cpt", "scripts")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.worker_out.write_text(json.dumps(worker(args.worker, json.loads(args.case))))
        return 0
    if not args.cpu_smoke:
        require_cuda()
    c = Check(args, machine_info(args))
    if "peak" not in args.checks and any(k in args.checks for k in ("throughput", "hf", "engines")):
        args.checks.insert(0, "peak")  # MFU needs it
    for check in [k for k in CHECKS if k in args.checks]:
        try:
            RUNNERS[check](c)
        except Exception as e:  # one broken check must not cost the others their rows
            c.add({"check": check, "status": "error", "note": f"{type(e).__name__}: {e}"[:300]})
    json_path, md_path = write_outputs(args.out, c.rows, c.info)
    bad = [r for r in c.rows if r["status"] in ("error", "fail")]
    print(f"gpu_check: {len(c.rows)} rows, {len(bad)} error/fail, {c.info['elapsed_s']} s; wrote {json_path} and "
          f"{md_path}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
