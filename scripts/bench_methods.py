"""Benchmark the anti-forgetting methods on the demo: one pre-trained model, one code stage per method.

The demo's English pre-training stage is run once (a temporary recipe holding only that stage). Each method
is then a ``cpt branch`` of that stage's final checkpoint with ``--with-data`` (so English replay reads on
where pre-training stopped, as in the demo), whose single stage is the demo's code stage — 150 steps, code
0.95 / English 0.05, the same re-warmed cosine — plus the method's options, evaluated every 10 steps. Every
branch sees the same batches; only the method differs.

Methods: plain CPT; self-distillation toward the stage's starting model (full KL, lambda 1, T 1; and Mix-CPT
logit swap); LoRA (rank 8 on all 7 Llama linear layers, alpha 16); HFT; L2-to-init; freezing the (tied)
embeddings. The L2 weight is not a tuned number: after the plain run, lambda is set so that the penalty at the
distance plain CPT moves the weights in this stage equals plain CPT's cross-entropy at the stage's first step,
``lambda = CE_1 / ||theta_plain_end - theta_0||^2`` — a pull as large as the loss it competes with early on.

What is measured per method, from each branch's ``metrics.jsonl`` and log:

- final upstream (English) and downstream (code) eval loss, at the stage's last step;
- stability-gap depth: the largest upstream eval loss during the stage minus its value at the stage's start,
  and the step where it peaks;
- seconds per step: median of ``tokens_per_s`` over the train rows after the first 10 steps (batch draw +
  ``train_step``, eval excluded), as seconds per step, and its ratio to plain CPT. Because each branch runs at
  a different time, load from other jobs on a shared machine skews that ratio; so the script also times
  ``cpt.trainer.train_step`` for every method in one process, the methods taking turns for a few steps each
  over several rounds (each set up with ``StageMethods`` on the pre-trained weights, the same random batch),
  and reports the ratio of those medians too. The verdict on step time uses the interleaved ratio;
- peak memory: the branch process's maximum resident set size from ``os.wait4`` (the whole process, so it
  includes Python, torch and the eval sets, not only the method's tensors);
- trainable parameters and AdamW state from the stage's start row; percentages are of the base model's
  parameters (LoRA's adapters are not counted in the base).

Usage::

    .venv/bin/python scripts/bench_methods.py            # full run (~12 min on 2 cores); rewrites the
                                                         # "Anti-forgetting methods on the demo" section
    .venv/bin/python scripts/bench_methods.py --steps 20 --no-write   # smoke run; prints only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
import benchmarks_md
from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
CPT = Path(sys.executable).parent / "cpt"
DEMO = ROOT / "recipes" / "demo.yaml"
HEADING = "## Anti-forgetting methods on the demo"
EVAL_EVERY = 10
WARM_STEPS = 10  # steps left out of the step-time median (first steps, allocator warm-up)
LORA_RANK = 8
LORA_TARGET = 0.05  # the bound on LoRA's trainable share
HFT_TARGET, HFT_TOLERANCE = 0.5, 0.02
DISTILL_SLOWDOWN = 1.6
TIMING_ROUNDS, TIMING_STEPS = 6, 4  # interleaved timing: rounds after a warm-up round, steps per turn


@dataclass
class Method:
    """One row: a name for the branch and the options added to the demo's code stage."""

    name: str
    label: str
    options: dict = field(default_factory=dict)


METHODS = [
    Method("plain", "plain CPT"),
    Method("distill", "self-distillation (full KL, lambda 1, T 1)",
           {"distill": {"kind": "full", "lambda": 1.0, "temperature": 1.0}}),
    Method("distill-swap", "self-distillation (logit swap, lambda 1, T 1)",
           {"distill": {"kind": "logit_swap", "lambda": 1.0, "temperature": 1.0}}),
    Method("lora", f"LoRA (rank {LORA_RANK}, alpha 16, 7 linear layers)",
           {"lora": {"rank": LORA_RANK, "alpha": 16.0}}),
    Method("hft", "HFT (seed 0)", {"hft": {"seed": 0}}),
    Method("l2", "L2-to-init", {"l2_init": {"lambda": None}}),  # lambda set from the plain run
    Method("freeze-emb", "frozen embeddings (tied in/out)", {"freeze": ["embed_tokens"]}),
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_child(args: list[str], log_path: Path) -> dict:
    """Run a ``cpt`` command with its output in ``log_path``; returns wall time and the child's peak RSS.

    ``os.wait4`` gives the rusage of that one child (``ru_maxrss`` in KiB on Linux), unlike
    ``RUSAGE_CHILDREN``, which keeps the maximum over every child waited for so far.
    """
    started = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    # Reaped by wait4, so tell Popen (else it warns that the process is still running).
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(map(str, args))} failed with exit status {code}; log {log_path}:\n{tail}")
    return {"wall_s": time.perf_counter() - started, "peak_rss": usage.ru_maxrss * 1024}


def demo_recipe() -> dict:
    return yaml.safe_load(DEMO.read_text())


def pretrain_recipe(demo: dict, work: Path, steps: int | None) -> dict:
    recipe = copy.deepcopy(demo)
    stage = next(s for s in recipe["stages"] if s["name"] == "pretrain")
    if steps:
        stage["steps"] = steps
    recipe["name"] = "pretrain"
    recipe["stages"] = [stage]
    recipe["run"] = {**recipe["run"], "dir": str(work / "pretrain"), "data_dir": str(work / "data")}
    return recipe


def method_recipe(demo: dict, work: Path, method: Method, steps: int | None) -> dict:
    recipe = copy.deepcopy(demo)
    stage = copy.deepcopy(next(s for s in recipe["stages"] if s["name"] == "cpt"))
    if steps:
        stage["steps"] = steps
    stage.update(copy.deepcopy(method.options))
    recipe["name"] = method.name
    recipe["stages"] = [stage]
    recipe["eval"] = {**recipe["eval"], "every": EVAL_EVERY}
    recipe["run"] = {**recipe["run"], "dir": str(work / "runs" / "{name}"), "data_dir": str(work / "data")}
    return recipe


def final_checkpoint(run_dir: Path, stage: str) -> Path:
    found = sorted((run_dir / "checkpoints" / stage).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise SystemExit(f"no checkpoint of stage '{stage}' in {run_dir}")
    return found[-1]


def squared_distance(a: Path, b: Path) -> float:
    """``sum ||a - b||^2`` over the tensors of two checkpoints' ``model.safetensors``."""
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return sum(float((left[k].double() - right[k].double()).pow(2).sum()) for k in left)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(run_dir: Path, log_path: Path, step_tokens: int) -> dict:
    """The measured numbers of one branch, from its metrics and log."""
    rows = read_rows(run_dir)
    start = next(r for r in rows if r["kind"] == "stage" and r.get("event") == "start")
    train = [r for r in rows if r["kind"] == "train"]
    evals = {name: sorted((r for r in rows if r["kind"] == "eval" and r["set"] == name),
                          key=lambda r: r["stage_step"]) for name in ("upstream", "downstream")}
    upstream = evals["upstream"]
    peak = max(upstream, key=lambda r: r["loss"])
    timed = [r["tokens_per_s"] for r in train if r["stage_step"] > WARM_STEPS] or [r["tokens_per_s"] for r in train]
    out = {
        "upstream_start": upstream[0]["loss"], "upstream_final": upstream[-1]["loss"],
        "downstream_start": evals["downstream"][0]["loss"], "downstream_final": evals["downstream"][-1]["loss"],
        "gap": peak["loss"] - upstream[0]["loss"], "gap_step": peak["stage_step"],
        "s_per_step": step_tokens / statistics.median(timed), "steps": len(train),
        "trainable": start["trainable_params"], "total": start["total_params"],
        "optimizer_bytes": start["optimizer_state_bytes"], "ce_first": train[0]["loss"],
    }
    for key in ("kl", "l2"):
        values = [r[key] for r in train if key in r]
        if values:
            out[f"{key}_first10"] = statistics.mean(values[:10])
            out[f"{key}_last10"] = statistics.mean(values[-10:])
    out["ce_last10"] = statistics.mean(r["loss"] for r in train[-10:])
    hft = re.search(r"HFT: training (\d+) of (\d+) targeted matrices", log_path.read_text())
    if hft:
        out["hft_trained"], out["hft_total"] = int(hft.group(1)), int(hft.group(2))
    return out


def interleaved_step_times(parent: Path, recipes: dict[str, Path], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per ``train_step`` of each method, the methods taking turns in this one process.

    Each method gets its own copy of the pre-trained model, set up by ``StageMethods`` as the trainer does and
    with its own AdamW. A turn is ``steps`` steps; every round visits every method, starting one further along
    each round, and the first round is a warm-up that is not counted. So a burst of load from other jobs falls
    on all methods alike, where the branches' own timings were taken minutes apart.
    """
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cpt.methods.stage import StageMethods
    from cpt.recipe import load_recipe
    from cpt.optim import build_optimizer
    from cpt.trainer import train_step

    accelerator = Accelerator(cpu=True)
    setups = {}
    for name, path in recipes.items():
        recipe, _ = load_recipe(path)
        stage = recipe.stages[0]
        model = AutoModelForCausalLM.from_pretrained(parent, local_files_only=True, dtype=torch.float32)
        methods = StageMethods(stage, 0, recipe.run.seed)
        model = accelerator.prepare(methods.setup(model))
        optimizer = accelerator.prepare(build_optimizer(model, recipe.train, stage.schedule.peak_lr))
        setups[name] = (model, optimizer, methods, recipe.train)
    train = next(iter(setups.values()))[3]
    generator = torch.Generator().manual_seed(0)
    vocab = next(iter(setups.values()))[0].get_input_embeddings().weight.shape[0]
    batches = [torch.randint(vocab, (train.micro_batch, train.seq_len + 1), generator=generator)
               for _ in range(train.grad_accum)]
    replay = [torch.zeros(train.micro_batch, dtype=torch.bool) for _ in batches]
    names, times = list(setups), {name: [] for name in setups}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, optimizer, methods, train = setups[name]
            for _ in range(steps):
                start = time.perf_counter()
                train_step(model, optimizer, batches, accelerator, train.grad_clip, methods, replay)
                if r > 0:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict[str, str]:
    import torch

    return benchmarks_md.machine(torch=torch.__version__, threads=str(torch.get_num_threads()))


def code_version() -> str:
    return benchmarks_md.code_version("cpt")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def format_section(results: dict[str, dict], methods: list[Method], info: dict) -> str:
    plain = results["plain"]
    base_total = plain["total"]
    m = info["machine"]
    lines = [
        f"Command: `{info['command']}` ({info['date']}). Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']} "
        f"({m['threads']} threads), Python {m['python']}. Code: {info['code']}. Total wall time "
        f"{info['wall_s'] / 60:.1f} min. Load average (1/5/15 min) {info['load'][0]} at the start and "
        f"{info['load'][1]} at the end; other jobs may share this machine, so step times are noisy.",
        "",
        f"Setup: the demo's English pre-training stage ({info['pretrain_steps']} steps) is run once; each method is "
        f"`cpt branch PRETRAIN_FINAL METHOD.yaml --with-data` with one stage, the demo's code stage "
        f"({info['cpt_steps']} steps, code 0.95 / English 0.05, cosine with peak 3e-3 and 5% warm-up, micro-batch "
        f"8 x 256) plus the method's options, evaluated every {EVAL_EVERY} steps (16,384 tokens per set). Every "
        "branch reads the same batches. Losses are held-out eval loss in nats/token: upstream = English, "
        "downstream = code. Gap = the largest upstream loss in the stage minus its value at the stage's start "
        f"({plain['upstream_start']:.2f}), at the step shown. Step time = median over steps {WARM_STEPS + 1}+ of "
        "batch draw + `train_step` (eval excluded). Peak RSS = the branch process's `ru_maxrss` (`os.wait4`): the "
        "whole process, about 0.5 GB of which is Python, torch and transformers, so it shows little of the "
        "methods' own tensors on a 1.4 M-parameter model. Trainable % is of the base model's "
        f"{base_total:,} parameters.",
        "",
        "| method | upstream final | upstream change | gap (step) | downstream final | s/step in run | vs plain "
        "| vs plain, interleaved | peak RSS MiB | trainable params | trainable % | AdamW state MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        r = results[method.name]
        lines.append(
            f"| {method.label} | {r['upstream_final']:.3f} | {r['upstream_final'] - r['upstream_start']:+.3f} "
            f"| {r['gap']:+.3f} ({r['gap_step']}) | {r['downstream_final']:.3f} | {r['s_per_step']:.3f} "
            f"| {r['s_per_step'] / plain['s_per_step']:.2f}x | {r['interleaved'] / plain['interleaved']:.2f}x "
            f"| {mib(r['peak_rss'])} | {r['trainable']:,} "
            f"| {100 * r['trainable'] / base_total:.1f}% | {mib(r['optimizer_bytes'])} |")
    lines += ["", f"Downstream loss at the stage's start: {plain['downstream_start']:.3f}. Wall time per branch "
              "(process start to exit, including data checks and evals), with the 1-minute load average when it "
              "ended: " + ", ".join(f"{m.name} {results[m.name]['wall_s']:.0f} s ({results[m.name]['load']:.1f})"
                                    for m in methods) + ".",
              "", f"Interleaved timing: {TIMING_ROUNDS} rounds (after a warm-up round) of {TIMING_STEPS} "
              "`train_step` calls per method, same random batch: "
              + ", ".join(f"{m.name} {results[m.name]['interleaved']:.3f}" for m in methods)
              + " s/step (median)."]
    if "l2" in results:
        r = results["l2"]
        lines += ["", f"L2-to-init lambda = {info['l2_lambda']:.3g}: plain CPT's cross-entropy at its first step "
                      f"({plain['ce_first']:.2f}) divided by the squared distance plain CPT moved the weights over the "
                      f"stage ({info['plain_distance2']:.4g}), so the penalty would equal that loss had the weights "
                      "moved as far as plain CPT's did. Logged penalty: "
                      f"{r['l2_first10']:.3g} (mean of the first 10 steps) and {r['l2_last10']:.3g} (last 10), against "
                      f"a cross-entropy of {r['ce_last10']:.2f} over the last 10 steps. The L2 run moved its weights "
                      f"{info['l2_distance2']:.4g} (squared distance), "
                      f"{info['l2_distance2'] / info['plain_distance2']:.0%} of plain CPT's."]
    for name in ("distill", "distill-swap"):
        if name in results and "kl_first10" in results[name]:
            r = results[name]
            lines += ["", f"{name}: KL to the teacher {r['kl_first10']:.3f} nats/token (mean of the first 10 steps), "
                          f"{r['kl_last10']:.3f} (last 10); cross-entropy over the last 10 steps {r['ce_last10']:.2f} "
                          f"(plain CPT {plain['ce_last10']:.2f})."]
    lines += ["", "Expectations (from the issue):", ""] + verdicts(results, base_total, info)
    return "\n".join(lines) + "\n"


def verdicts(results: dict[str, dict], base_total: int, info: dict) -> list[str]:
    """One line per expectation, held or not, from the measured numbers."""
    plain = results["plain"]
    out = []
    for name in ("distill", "distill-swap", "hft", "l2"):
        if name not in results:
            continue
        r = results[name]
        final = r["upstream_final"] < plain["upstream_final"]
        gap = r["gap"] < plain["gap"]
        out.append(f"- {name} reduces upstream forgetting relative to plain CPT: "
                   + ("**held**" if final else "**did not hold**")
                   + f" on final upstream loss ({r['upstream_final']:.3f} vs {plain['upstream_final']:.3f}); "
                   + f"gap {r['gap']:+.3f} vs {plain['gap']:+.3f} ({'smaller' if gap else 'not smaller'}); "
                   + f"downstream {r['downstream_final']:.3f} vs {plain['downstream_final']:.3f}.")
    if "lora" in results:
        r = results["lora"]
        share = r["trainable"] / base_total
        per_rank = r["trainable"] / LORA_RANK
        rank = int(LORA_TARGET * base_total // per_rank)
        out.append(f"- LoRA trains < {LORA_TARGET:.0%} of parameters: "
                   + ("**held**" if share < LORA_TARGET else "**did not hold**")
                   + f" at rank {LORA_RANK}: {r['trainable']:,} of {base_total:,} ({share:.1%}); each unit of rank "
                     f"adds {per_rank:,.0f} parameters on this model, so rank {rank} or less is needed for < "
                     f"{LORA_TARGET:.0%} ({rank * per_rank / base_total:.1%} at rank {rank}). On a larger model the "
                     "share falls with hidden size (it is about 2r(d + d_ff) per layer against 4d^2 + 3d d_ff).")
    if "hft" in results and "hft_trained" in results["hft"]:
        r = results["hft"]
        share = r["hft_trained"] / r["hft_total"]
        held = abs(share - HFT_TARGET) <= HFT_TOLERANCE
        saved = 1 - r["optimizer_bytes"] / plain["optimizer_bytes"]
        out.append(f"- HFT trains {HFT_TARGET:.0%} +- {HFT_TOLERANCE:.0%} of the targeted matrices: "
                   + ("**held**" if held else "**did not hold**")
                   + f" ({r['hft_trained']} of {r['hft_total']}, {share:.1%}). It cuts AdamW state by {saved:.0%} "
                     f"({mib(r['optimizer_bytes'])} vs {mib(plain['optimizer_bytes'])} MiB), not by half: HFT leaves "
                     "the embeddings, which are "
                     f"{100 * info['embedding_params'] / base_total:.0f}% of this tiny model's parameters, "
                     "and the final norm trainable.")
    for name in ("distill", "distill-swap"):
        if name in results:
            r = results[name]
            ratio = r["interleaved"] / plain["interleaved"]
            out.append(f"- {name} step time at most {DISTILL_SLOWDOWN}x plain CPT: "
                       + ("**held**" if ratio <= DISTILL_SLOWDOWN else "**did not hold**")
                       + f" ({ratio:.2f}x interleaved: {r['interleaved']:.3f} vs {plain['interleaved']:.3f} s/step; "
                         f"{r['s_per_step'] / plain['s_per_step']:.2f}x from the branches' own step times).")
    return out


def embedding_params(checkpoint: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for k, t in load_file(checkpoint / "model.safetensors").items() if "embed_tokens" in k)


def pretrain_once(demo: dict, work: Path, steps: int | None) -> tuple[dict, Path]:
    """Run the demo's English pre-training stage once under ``work``; its recipe and final checkpoint."""
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    pretrain = pretrain_recipe(demo, work, steps)
    path = work / "recipes" / "pretrain.yaml"
    path.write_text(yaml.safe_dump(pretrain, sort_keys=False))
    log(f"pre-training once: {CPT} run {path}")
    done = run_child([str(CPT), "run", str(path), "--overwrite"], work / "logs" / "pretrain.log")
    log(f"  {done['wall_s']:.0f} s")
    return pretrain, final_checkpoint(work / "pretrain", "pretrain")


def run(work: Path, steps: int | None, names: list[str]) -> tuple[dict[str, dict], list[Method], dict]:
    demo = demo_recipe()
    methods = [m for m in METHODS if m.name in names]
    pretrain, parent = pretrain_once(demo, work, steps)
    train = demo["train"]
    step_tokens = train["micro_batch"] * train["grad_accum"] * train["seq_len"]
    results: dict[str, dict] = {}
    info: dict = {"pretrain_steps": pretrain["stages"][0]["steps"], "embedding_params": embedding_params(parent)}
    for method in methods:
        recipe = method_recipe(demo, work, method, steps)
        info["cpt_steps"] = recipe["stages"][0]["steps"]
        if method.name == "l2":
            plain_end = final_checkpoint(work / "runs" / "plain", "cpt")
            info["plain_distance2"] = squared_distance(parent, plain_end)
            info["l2_lambda"] = results["plain"]["ce_first"] / info["plain_distance2"]
            recipe["stages"][0]["l2_init"]["lambda"] = info["l2_lambda"]
        path = work / "recipes" / f"{method.name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        log_path = work / "logs" / f"{method.name}.log"
        log(f"{method.name}: {CPT} branch {parent} {path} --name {method.name} --with-data")
        done = run_child([str(CPT), "branch", str(parent), str(path), "--name", method.name, "--with-data",
                          "--overwrite"], log_path)
        results[method.name] = {**summarise(work / "runs" / method.name, log_path, step_tokens), **done,
                                "load": os.getloadavg()[0]}
        r = results[method.name]
        log(f"  {done['wall_s']:.0f} s: upstream {r['upstream_final']:.3f} (gap {r['gap']:+.3f}), downstream "
            f"{r['downstream_final']:.3f}, {r['s_per_step']:.3f} s/step, peak RSS {mib(r['peak_rss'])} MiB, "
            f"trainable {r['trainable']:,}")
        if method.name == "l2":
            info["l2_distance2"] = squared_distance(parent, final_checkpoint(work / "runs" / "l2", "cpt"))
    log(f"interleaved timing: {TIMING_ROUNDS} rounds of {TIMING_STEPS} steps per method")
    recipes = {m.name: work / "recipes" / f"{m.name}.yaml" for m in methods}
    for name, seconds in interleaved_step_times(parent, recipes, TIMING_ROUNDS, TIMING_STEPS).items():
        results[name]["interleaved"] = seconds
        log(f"  {name}: {seconds:.3f} s/step")
    return results, methods, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="steps of both stages (smoke run; default: the demo's)")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS),
                        help="comma-separated subset of: " + ", ".join(m.name for m in METHODS) + " (plain is "
                             "always run: the others are compared with it)")
    parser.add_argument("--work", type=Path, help="keep recipes, runs and logs here (default: a temporary "
                                                  "directory, removed at the end)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing it")
    args = parser.parse_args()
    names = ["plain", *(n for n in args.methods.split(",") if n and n != "plain")]
    unknown = set(names) - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(m.name for m in METHODS)}")
    started, load_start = time.time(), os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_methods_"))
    try:
        results, methods, info = run(work.resolve(), args.steps, names)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python scripts/bench_methods.py" + (f" --steps {args.steps}" if args.steps else "") \
        + (f" --methods {args.methods}" if args.methods != parser.get_default("methods") else "")
    info.update(command=command, date=time.strftime("%Y-%m-%d"), machine=machine(), code=code_version(),
                wall_s=time.time() - started,
                load=[" / ".join(f"{x:.2f}" for x in v) for v in (load_start, os.getloadavg())])
    body = format_section(results, methods, info)
    print(f"{HEADING}\n\n{body}")
    log(f"({info['wall_s']:.0f} s)")
    if not args.no_write and not args.steps:
        write_section(args.out, HEADING, body)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
