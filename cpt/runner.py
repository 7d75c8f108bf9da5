"""Build a run's objects in dependency order and run it: recipe -> run dir -> data -> model -> trainer ->
report. The CLI calls these; tests can too."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from cpt.errors import CptError
from cpt.recipe import Recipe, load_recipe

log = logging.getLogger("cpt")

RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "report", "config.yaml")


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


def prepare_data(recipe_path: str, overrides: list[str]):
    """``cpt prepare``: tokenizer and token shards only."""
    from cpt.data.prepare import prepare

    recipe, base_dir = load_recipe(recipe_path, overrides)
    return prepare(recipe, base_dir, data_dir(recipe, base_dir))


def _claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise CptError(f"run directory '{run_dir}' already holds a run ({', '.join(existing)}); pass "
                       "run.dir=NEW_DIR for a new run, or --overwrite to replace it (prepared data is kept)")
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def run(recipe_path: str, overrides: list[str], overwrite: bool = False) -> Path:
    """``cpt run``: prepare data, train every stage, evaluate, write the report. Returns the run directory."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from cpt.data.prepare import prepare
    from cpt.metrics import MetricsLogger
    from cpt.model import build_model
    from cpt.report import format_stage_table, write_report
    from cpt.trainer import Trainer

    recipe, base_dir = load_recipe(recipe_path, overrides)
    # cpu=True without a GPU makes Accelerate start gloo when launched with several processes (torchrun).
    accelerator = Accelerator(mixed_precision=resolve_precision(recipe.train.mixed_precision),
                              cpu=not torch.cuda.is_available())
    setup_logging(accelerator.is_main_process)
    run_dir = recipe.run_dir
    config_text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    if accelerator.is_main_process:
        _claim_run_dir(run_dir, overwrite)
        (run_dir / "config.yaml").write_text(config_text)
        log.info("resolved config (saved to %s):\n%s", run_dir / "config.yaml", config_text.rstrip())
    accelerator.wait_for_everyone()

    with accelerator.main_process_first():
        data = prepare(recipe, base_dir, data_dir(recipe, base_dir))
    set_seed(recipe.run.seed)
    model = build_model(recipe.model, data.tokenizer, recipe.train.seq_len, base_dir)
    metrics = MetricsLogger(run_dir, recipe.wandb, recipe.name, recipe.to_dict(), accelerator.is_main_process)
    try:
        Trainer(recipe, run_dir, model, data, accelerator, metrics).fit()
    finally:
        metrics.close()
    if accelerator.is_main_process:
        png, table = write_report(run_dir)
        log.info("eval loss before/after each stage:\n%s\ncurves: %s", table, png)
    accelerator.end_training()
    return run_dir
