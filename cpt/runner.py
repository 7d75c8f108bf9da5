"""Build a run's objects in dependency order and run it: recipe -> run dir -> data -> model -> trainer ->
report. The CLI calls these; tests can too."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from cpt import rundir
from cpt.checkpoint import latest_intact, list_checkpoints, load_train_state, read_meta, verify_checkpoint
from cpt.errors import CptError
from cpt.recipe import Recipe, load_recipe

log = logging.getLogger("cpt")

# Recipe keys that may change between a checkpoint and its resume: they do not touch the training math.
HARMLESS_CHANGES = ("wandb", "checkpoint", "eval", "train.log_every", "run.data_dir", "run.dir", "data.task_mb")


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_precision(setting: str) -> str:
    """``auto`` means bf16 where the GPU supports it, fp32 elsewhere (CPU autocast is slower than fp32)."""
    import torch

    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def data_dir(recipe: Recipe, base_dir: Path) -> Path:
    return Path(recipe.run.data_dir) if recipe.run.data_dir else recipe.run_dir / "data"


def prepare_data(recipe_path: str, overrides: list[str], workers: int = 1, part: tuple[int, int] | None = None):
    """``cpt prepare``: tokenizer and token shards only, ``workers`` processes tokenizing; with ``part`` (I, N),
    only the I-th of N parts of the tasks (a slurm array task), leaving the corpora unassembled (None)."""
    from cpt.data.prepare import prepare

    recipe, base_dir = load_recipe(recipe_path, overrides)
    return prepare(recipe, base_dir, data_dir(recipe, base_dir), workers=workers, part=part)


def run(recipe_path: str, overrides: list[str], overwrite: bool = False, resume: bool = False,
        auto_resume: bool = False, workers: int = 1) -> Path:
    """``cpt run``: prepare data, train every stage, evaluate, write the report. Returns the run directory.
    With ``resume``, continue the recipe's run directory from its newest intact checkpoint instead. With
    ``auto_resume`` (what slurm jobs run, so that a requeued job continues): resume when the run directory has
    a checkpoint, else start the run, replacing one that was stopped before it wrote any checkpoint.
    ``workers`` processes tokenize the corpora that are not prepared yet."""
    if auto_resume and (resume or overwrite):
        raise CptError("--auto-resume chooses between resuming and starting by itself; drop --resume/--overwrite")
    recipe, base_dir = load_recipe(recipe_path, overrides)
    with rundir.locked(recipe.run_dir):
        if auto_resume:
            resume, overwrite = bool(list_checkpoints(recipe.run_dir)), True
        if resume:
            return _resume(recipe, base_dir, _read_run_info(recipe.run_dir).get("lineage"), workers=workers)
        return _execute(recipe, base_dir, overwrite=overwrite, recipe_path=recipe_path, workers=workers)


def resume(run_dir: str, overrides: list[str]) -> Path:
    """``cpt resume``: continue a run from its newest intact checkpoint, with the recipe it was started with."""
    run_dir = Path(run_dir)
    info = _read_run_info(run_dir)
    recipe, _ = load_recipe(run_dir / "config.yaml", [*overrides, f"run.dir={json.dumps(str(run_dir))}"])
    with rundir.locked(recipe.run_dir):
        return _resume(recipe, Path(info["base_dir"]), info.get("lineage"))


def branch(checkpoint: str, recipe_path: str, overrides: list[str], name: str | None = None,
           with_optimizer: bool = False, with_data: bool = False, overwrite: bool = False, workers: int = 1) -> Path:
    """``cpt branch``: a new run whose first stage starts from ``checkpoint``'s weights (and optionally its
    optimizer state and data position), recording its lineage."""
    path = Path(checkpoint).resolve()
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CptError(f"cannot branch from {checkpoint}: {problem}")
    meta = read_meta(path)
    pinned = [f"model={json.dumps({'init': str(path)})}", f"tokenizer={json.dumps({'path': str(path)})}"]
    recipe, base_dir = load_recipe(recipe_path, [*overrides, *pinned] + ([f"name={name}"] if name else []))
    lineage = {"parent_run": str(path.parent.parent.parent), "checkpoint": str(path), "stage": meta["stage"],
               "step": meta["global_step"], "parent_recipe_fingerprint": meta["recipe_fingerprint"],
               "with_optimizer": with_optimizer, "with_data": with_data}
    from cpt.optim import optimizer_state

    state = load_train_state(path, meta) if (with_optimizer or with_data) else {}
    carry = {"optimizer": optimizer_state(path, state) if with_optimizer else None,
             "data": state.get("data") if with_data else None}
    with rundir.locked(recipe.run_dir):
        return _execute(recipe, base_dir, overwrite=overwrite, lineage=lineage, carry=carry, recipe_path=recipe_path,
                        workers=workers)


def run_recipe_and_data(run_dir: Path):
    """A finished or running run's recipe (its ``config.yaml``) and its prepared data (from the cache)."""
    from cpt.data.prepare import prepare

    info = _read_run_info(run_dir)
    recipe, _ = load_recipe(run_dir / "config.yaml", [f"run.dir={json.dumps(str(run_dir))}"])
    return recipe, prepare(recipe, Path(info["base_dir"]), data_dir(recipe, Path(info["base_dir"])))


def _read_run_info(run_dir: Path) -> dict:
    info = rundir.read_run_info(run_dir)
    if info is None:
        raise CptError(f"'{run_dir}' is not a cpt run directory (no run.json); start it with `cpt run RECIPE`")
    return info


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two plain config trees, with (old, new) values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in dict.fromkeys([*old, *new])
                for c in config_changes(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in config_changes(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [(prefix, old, new)]


def _resume(recipe: Recipe, base_dir: Path, lineage: dict | None, workers: int = 1) -> Path:
    found = latest_intact(recipe.run_dir)
    if found is None:
        raise CptError(f"no intact checkpoint in {recipe.run_dir}; start the run again with `cpt run RECIPE --overwrite`")
    meta, path = found
    saved = yaml.safe_load((path / "config.yaml").read_text())
    blocking = [c for c in config_changes(saved, recipe.to_dict()) if not c[0].startswith(HARMLESS_CHANGES)]
    if blocking:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in blocking[:8])
        raise CptError(f"cannot resume {recipe.run_dir}: the recipe changed since {path.name} ({listed}); revert "
                       "it, or start a new run from that checkpoint with `cpt branch`")
    return _execute(recipe, base_dir, resume_from=path, keep_rows=meta["metrics_rows"], lineage=lineage,
                    workers=workers)


def _execute(recipe: Recipe, base_dir: Path, overwrite: bool = False, resume_from: Path | None = None,
             keep_rows: int | None = None, lineage: dict | None = None, carry: dict | None = None,
             recipe_path: str | None = None, workers: int = 1) -> Path:
    """Build everything in dependency order and train: accelerator -> run dir -> data -> model -> trainer."""
    from accelerate.utils import set_seed

    from cpt.data.prepare import prepare
    from cpt.distributed import make_accelerator
    from cpt.metrics import MetricsLogger
    from cpt.model import build_model
    from cpt.report import write_report
    from cpt.trainer import Trainer

    accelerator = make_accelerator(recipe, resolve_precision(recipe.train.mixed_precision), base_dir)
    setup_logging(accelerator.is_main_process)
    run_dir = recipe.run_dir
    config_text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    if accelerator.is_main_process:
        if resume_from is None:
            rundir.claim(run_dir, overwrite)
            info = {"recipe": str(Path(recipe_path).resolve()) if recipe_path else None, "base_dir": str(base_dir),
                    "lineage": lineage}
            (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        else:
            rundir.remove_stale_staging(run_dir)
            rundir.keep_rows(run_dir / "metrics.jsonl", keep_rows)
        (run_dir / "config.yaml").write_text(config_text)
        log.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", config_text.rstrip())
    accelerator.wait_for_everyone()

    with accelerator.main_process_first():
        data = prepare(recipe, base_dir, data_dir(recipe, base_dir), workers=workers)
    set_seed(recipe.run.seed)
    model = build_model(recipe.model, data.tokenizer, recipe.train.seq_len, base_dir)
    metrics = MetricsLogger(run_dir, recipe.wandb, recipe.name, recipe.to_dict(), accelerator.is_main_process)
    try:
        trainer = Trainer(recipe, run_dir, model, data, accelerator, metrics, lineage)
        if carry:
            trainer.carry_over(carry.get("optimizer"), carry.get("data"))
        trainer.fit(resume_from)
    finally:
        metrics.close()
    if accelerator.is_main_process:
        png, table = write_report(run_dir)
        log.info("eval loss before/after each stage:\n%s\ncurves: %s", table, png)
    accelerator.end_training()
    return run_dir

