"""Benchmark the forgetting budget on the demo: fixed replay rates against ``rate: auto`` and Reptile/MER.

The demo's English pre-training stage is run once; every variant is then a ``cpt branch`` of its final checkpoint
with ``--with-data`` whose one stage is the demo's code stage (150 steps, the same re-warmed cosine), evaluated
every 10 steps, with the stage's own mixture ``{code: 1.0}`` and English replayed as ``replay: {kind: corpus}``:

- fixed replay 0% (no replay), 5%, 10%, 25% and 50% (the automatic rate's default ``max``: whether any rate it
  may reach holds a tolerance);
- ``rate: auto`` holding the upstream (English) loss within 2%, 5% and 10% of its value at the stage's start, with
  the controller's defaults (``ReplayConfig``'s and ``HoldConfig``'s);
- MER: 5% fixed replay with ``reptile: {every: 10, beta: 0.5}``.

Per variant, from its ``metrics.jsonl``: upstream loss at the start, at the end and at its peak (the stability gap's
depth and step), downstream loss at the end, the English (replay) tokens drawn in the stage, and whether each
tolerance held at every evaluation from stage step ``HOLD_FROM`` on ("after the first few": the first
evaluations fall inside the stability gap, which no rate chosen after them can undo). The issue's claim is then
checked per tolerance: the auto rate holds it with fewer replay tokens than the cheapest fixed rate that holds it.

Usage::

    .venv/bin/python scripts/bench_replay.py              # full run (~15 min on 2 cores); rewrites the
                                                          # "Forgetting budget on the demo" section
    .venv/bin/python scripts/bench_replay.py --steps 20 --no-write   # smoke run; prints only
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_methods import CPT, code_version, demo_recipe, log, machine, pretrain_once, read_rows, run_child
from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Forgetting budget on the demo"
EVAL_EVERY = 10
HOLD_FROM = 30  # stage step from which a tolerance must hold at every evaluation
TOLERANCES = (0.02, 0.05, 0.10)
FIXED = (0.0, 0.05, 0.10, 0.25, 0.50)  # 50%: the automatic rate's default max
MER = {"every": 10, "beta": 0.5}
MER_RATE = 0.05


def controller_defaults() -> str:
    from dataclasses import fields

    from cpt.data.auto_replay import HoldConfig
    from cpt.data.replay import ReplayConfig

    replay = {f.name: f.default for f in fields(ReplayConfig)}
    aim = next(f.default for f in fields(HoldConfig) if f.name == "aim")
    return ", ".join(f"{k} {replay[k]:g}" for k in ("start", "min", "max", "gain", "integral")) + f", aim {aim:g}"


def variants() -> dict[str, dict]:
    """Name -> the options the demo's code stage gets (its mixture becomes code only)."""
    out: dict[str, dict] = {}
    for rate in FIXED:
        out[f"fixed-{rate:.0%}"] = ({"replay": {"kind": "corpus", "from": ["english"], "rate": rate}} if rate else {})
    for tolerance in TOLERANCES:
        out[f"auto-{tolerance:.0%}"] = {"replay": {"kind": "corpus", "from": ["english"], "rate": "auto",
                                                   "hold": {"set": "upstream", "tolerance": tolerance}}}
    out[f"mer-{MER_RATE:.0%}"] = {"replay": {"kind": "corpus", "from": ["english"], "rate": MER_RATE},
                                  "reptile": dict(MER)}
    return out


def variant_recipe(demo: dict, work: Path, name: str, options: dict, steps: int | None) -> dict:
    recipe = copy.deepcopy(demo)
    stage = copy.deepcopy(next(s for s in recipe["stages"] if s["name"] == "cpt"))
    stage["mixture"] = {"code": 1.0}
    if steps:
        stage["steps"] = steps
    stage.update(copy.deepcopy(options))
    recipe["name"] = name
    recipe["stages"] = [stage]
    recipe["eval"] = {**recipe["eval"], "every": EVAL_EVERY}
    recipe["run"] = {**recipe["run"], "dir": str(work / "runs" / "{name}"), "data_dir": str(work / "data")}
    return recipe


def summarise(run_dir: Path, hold_from: int) -> dict:
    rows = read_rows(run_dir)
    upstream = sorted((r for r in rows if r["kind"] == "eval" and r["set"] == "upstream"), key=lambda r: r["stage_step"])
    downstream = sorted((r for r in rows if r["kind"] == "eval" and r["set"] == "downstream"),
                        key=lambda r: r["stage_step"])
    start = upstream[0]["loss"]
    peak = max(upstream, key=lambda r: r["loss"])
    later = [r for r in upstream if r["stage_step"] >= hold_from]
    tokens = {r["source"]: r["tokens"] for r in rows if r["kind"] == "data"}
    rates = [(r["stage_step"], r["rate"]) for r in rows if r["kind"] == "replay"]
    return {
        "upstream_start": start, "upstream_final": upstream[-1]["loss"], "peak": peak["loss"],
        "peak_step": peak["stage_step"], "downstream_start": downstream[0]["loss"],
        "downstream_final": downstream[-1]["loss"], "replay_tokens": tokens.get("english", 0),
        "total_tokens": sum(tokens.values()), "rates": rates,
        # the largest relative rise over the start among the evaluations that must hold
        "worst_later": max((r["loss"] - start) / start for r in later) if later else float("nan"),
        "evals_later": len(later),
    }


def holds(result: dict, tolerance: float) -> bool:
    return result["worst_later"] <= tolerance


def run(work: Path, steps: int | None) -> tuple[dict[str, dict], dict]:
    demo = demo_recipe()
    pretrain, parent = pretrain_once(demo, work, steps)
    hold_from = min(HOLD_FROM, steps or HOLD_FROM)
    results, info = {}, {"pretrain_steps": pretrain["stages"][0]["steps"], "hold_from": hold_from}
    for name, options in variants().items():
        recipe = variant_recipe(demo, work, name, options, steps)
        info["cpt_steps"] = recipe["stages"][0]["steps"]
        path = work / "recipes" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        log(f"{name}: {CPT} branch {parent} {path} --name {name} --with-data")
        done = run_child([str(CPT), "branch", str(parent), str(path), "--name", name, "--with-data", "--overwrite"],
                         work / "logs" / f"{name}.log")
        results[name] = {**summarise(work / "runs" / name, hold_from), "wall_s": done["wall_s"]}
        r = results[name]
        log(f"  {done['wall_s']:.0f} s: upstream {r['upstream_start']:.3f} -> {r['upstream_final']:.3f} (peak "
            f"{r['peak']:.3f} at {r['peak_step']}), downstream {r['downstream_final']:.3f}, replay tokens "
            f"{r['replay_tokens']:,}, worst rise from step {hold_from} {r['worst_later']:+.1%}")
    return results, info


def format_section(results: dict[str, dict], info: dict) -> str:
    m = info["machine"]
    base = results["fixed-0%"]
    lines = [
        f"Command: `{info['command']}` ({info['date']}). Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']} "
        f"({m['threads']} threads), Python {m['python']}. Code: {info['code']}. Total wall time "
        f"{info['wall_s'] / 60:.1f} min.",
        "",
        f"Setup: the demo's English pre-training stage ({info['pretrain_steps']} steps) is run once; each variant is "
        "`cpt branch PRETRAIN_FINAL VARIANT.yaml --with-data` with one stage, the demo's code stage "
        f"({info['cpt_steps']} steps, cosine with peak 3e-3 and 5% warm-up, micro-batch 8 x 256) whose own mixture is "
        "code only, English replayed by `replay: {kind: corpus, from: [english]}` at the rate shown, evaluated every "
        f"{EVAL_EVERY} steps (4,096 tokens per set). Losses are held-out eval loss in nats/token; upstream = English "
        f"(start {base['upstream_start']:.3f}), downstream = code (start {base['downstream_start']:.3f}). Peak = the "
        "largest upstream loss in the stage (the stability gap), at the step shown. Replay tokens = English tokens "
        f"drawn in the stage (of {base['total_tokens']:,}). Worst rise = the largest upstream loss relative to the "
        f"start among the evaluations from stage step {info['hold_from']} on; a tolerance holds when it is at most "
        f"the tolerance. Auto: the controller's defaults ({controller_defaults()}). MER: {MER_RATE:.0%} replay with `reptile: {{every: {MER['every']}, beta: {MER['beta']}}}` (the "
        "authors' k = 500 is longer than this stage; these are not tuned).",
        "",
        "| variant | upstream final | upstream peak (step) | gap | downstream final | replay tokens | worst rise "
        f"from step {info['hold_from']} | " + " | ".join(f"holds {t:.0%}" for t in TOLERANCES) + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(TOLERANCES),
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['upstream_final']:.3f} | {r['peak']:.3f} ({r['peak_step']}) "
            f"| {r['peak'] - r['upstream_start']:+.3f} | {r['downstream_final']:.3f} | {r['replay_tokens']:,} "
            f"| {r['worst_later']:+.1%} | " + " | ".join("yes" if holds(r, t) else "no" for t in TOLERANCES) + " |")
    lines += ["", "Automatic rates (stage step: rate after that evaluation):", ""]
    for name, r in results.items():
        if r["rates"]:
            lines.append(f"- {name}: " + ", ".join(f"{s}: {rate:.3f}" for s, rate in r["rates"]))
    lines += ["", "The claim (from the issue): the auto rate holds its tolerance at every evaluation after the first "
                  "few, with fewer replay tokens than the cheapest fixed rate that also holds it.", ""]
    lines += verdicts(results)
    return "\n".join(lines) + "\n"


def verdicts(results: dict[str, dict]) -> list[str]:
    out = []
    fixed = [(name, r) for name, r in results.items() if name.startswith("fixed-")]
    for tolerance in TOLERANCES:
        auto = results.get(f"auto-{tolerance:.0%}")
        if auto is None:
            continue
        cheapest = next(((name, r) for name, r in fixed if holds(r, tolerance)), None)
        auto_holds = holds(auto, tolerance)
        if cheapest is None:
            verdict = ("**held**" if auto_holds else "**did not hold**") + \
                f": no fixed rate tried holds {tolerance:.0%}; the auto rate's worst rise is {auto['worst_later']:+.1%}"
        else:
            name, r = cheapest
            fewer = auto["replay_tokens"] < r["replay_tokens"]
            verdict = ("**held**" if auto_holds and fewer else "**did not hold**") + \
                f": auto worst rise {auto['worst_later']:+.1%} ({'within' if auto_holds else 'beyond'} {tolerance:.0%}) " \
                f"with {auto['replay_tokens']:,} replay tokens; the cheapest fixed rate that holds it is {name} with " \
                f"{r['replay_tokens']:,} ({'more' if fewer else 'fewer or as many'})"
        out.append(f"- tolerance {tolerance:.0%}: {verdict}; downstream {auto['downstream_final']:.3f}.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="steps of both stages (smoke run; default: the demo's)")
    parser.add_argument("--work", type=Path, help="keep recipes, runs and logs here (default: a temporary "
                                                  "directory, removed at the end)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing it")
    args = parser.parse_args()
    started = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_replay_"))
    try:
        results, info = run(work.resolve(), args.steps)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    info.update(command="python scripts/bench_replay.py" + (f" --steps {args.steps}" if args.steps else ""),
                date=time.strftime("%Y-%m-%d"), code=code_version(), wall_s=time.time() - started,
                machine=machine())
    body = format_section(results, info)
    print(f"{HEADING}\n\n{body}")
    if not args.no_write and not args.steps:
        write_section(args.out, HEADING, body)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
