"""``cpt eval CHECKPOINT --lm-eval TASKS``: EleutherAI's lm-evaluation-harness on a checkpoint, offline.

A cpt checkpoint directory is already a plain Hugging Face model directory (LoRA adapters are merged into
its weights and kept apart in a subdirectory), so the harness's ``hf`` model loads it as it is; an
exported directory (``cpt export``) works the same way.

Tasks come from three places, searched in this order:

- **the run's held-out sets**: when the checkpoint belongs to a run, every eval set of its recipe becomes a
  task ``cpt_<set>``: the set's held-out documents (the ones ``metrics.jsonl`` is measured on, decoded back
  to text, up to the set's token budget) written as local JSONL under ``RUN_DIR/lm_eval/tasks/``, scored as
  rolling log-likelihood (word/byte perplexity and bits per byte, as the harness's ``wikitext`` task);
- **directories given with ``--include``**: any harness task YAML whose ``dataset_path`` is a local
  builder (``json``, ``csv``, ``parquet``, ``text``, ``arrow``) with ``dataset_kwargs.data_files`` pointing
  at local files — multiple-choice tasks included (see ``docs/lm-eval.md``);
- **the harness's own task registry**, for tasks that read local files.

Everything runs with the Hugging Face Hub switched off (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``); a task
that needs to download its dataset is refused before any model is loaded, naming the dataset and the fix.

Results go beside the run: ``RUN_DIR/lm_eval/<stage>-step-<N>.json`` (or ``--out``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import yaml

from cpt.config import suggest
from cpt.errors import CptError

log = logging.getLogger(__name__)

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
TASK_PREFIX = "cpt_"
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def offline() -> None:
    """Switch the Hub off for this process before ``datasets``/``transformers`` read these variables."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"


def locate(checkpoint: Path) -> tuple[Path | None, str]:
    """The run a checkpoint belongs to (``None`` for an exported directory) and a label for its results.

    Raises:
        CptError: not a model directory, or a cpt checkpoint that does not verify.
    """
    from cpt.checkpoint import read_meta, verify_checkpoint

    if not (checkpoint / "config.json").is_file():
        raise CptError(f"'{checkpoint}' is not a model directory (no config.json); pass a checkpoint such as "
                       "RUN_DIR/checkpoints/STAGE/step-N or a directory written by `cpt export`")
    meta = read_meta(checkpoint)
    if meta is None:
        return None, checkpoint.name
    problem = verify_checkpoint(checkpoint)
    if problem is not None:
        raise CptError(f"checkpoint {checkpoint} is not intact ({problem}); evaluate another checkpoint")
    run_dir = checkpoint.parent.parent.parent
    return (run_dir if (run_dir / "run.json").is_file() else None), f"{meta['stage']}-step-{meta['global_step']}"


def heldout_documents(tokens: np.ndarray, eos_id: int, tokenizer, max_tokens: int) -> list[str]:
    """The first documents of a shard split (each ends with ``eos_id``), decoded, until they hold at least
    ``max_tokens`` tokens (or the split ends)."""
    ends = np.flatnonzero(tokens == eos_id)
    docs, start, used = [], 0, 0
    for end in ends:
        if end > start:
            docs.append(tokenizer.decode(tokens[start:end].tolist()))
            used += end - start
        start = end + 1
        if used >= max_tokens:
            break
    return docs


def rolling_task(name: str, data_file: Path) -> dict:
    """A harness task scoring every document of a local JSONL file (``{"text": ...}`` per line) by
    rolling log-likelihood, as the harness's ``wikitext`` task does."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": "bits_per_byte" if m == "bits_per_byte" else
                             "weighted_perplexity", "higher_is_better": False} for m in ROLLING_METRICS],
            "metadata": {"version": 1.0, "source": "cpt held-out split"}}


def write_heldout_tasks(run_dir: Path) -> Path:
    """One ``cpt_<set>`` rolling-perplexity task per eval set of the run, under ``RUN_DIR/lm_eval/tasks``."""
    from cpt.runner import run_recipe_and_data

    recipe, data = run_recipe_and_data(run_dir)
    out = run_dir / "lm_eval" / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for name, config in recipe.eval.resolved.items():
        shard = data.corpora[config.corpus]
        tokens = shard.val.tokens if config.split == "val" else np.concatenate([shard.train.tokens, shard.val.tokens])
        docs = heldout_documents(np.asarray(tokens), data.tokenizer.eos_token_id, data.tokenizer,
                                 config.max_tokens or recipe.eval.max_tokens)
        task = TASK_PREFIX + name
        data_file = out / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        (out / f"{task}.yaml").write_text(yaml.safe_dump(rolling_task(task, data_file), sort_keys=False))
    return out


def needs_hub(config: dict) -> str | None:
    """The Hub dataset a task config would download, or ``None`` when it reads local files."""
    path = config.get("dataset_path")
    if path is None or path in LOCAL_BUILDERS or Path(str(path)).expanduser().exists():
        return None
    return str(path)


def task_manager(names: list[str], include: list[Path]):
    """A harness TaskManager that knows ``names``; the harness's own registry (a few seconds to index) is
    read only when a name is not among the local tasks.

    Raises:
        CptError: an unknown task, or one that needs the Hub.
    """
    from lm_eval.tasks import TaskManager

    for path in include:
        if not path.is_dir():
            raise CptError(f"--include {path}: no such directory of task YAMLs")
    manager = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=False)
    if any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=[str(p) for p in include] or None)
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            local = ", ".join(t for t in manager.all_tasks if t.startswith(TASK_PREFIX)) or (
                f"none (the {TASK_PREFIX}* tasks come with a checkpoint inside a run, or with "
                "--include RUN_DIR/lm_eval/tasks)")
            raise CptError(f"unknown lm-eval task '{name}'{suggest(name, manager.all_tasks)}; held-out tasks: "
                           f"{local}; add your own with --include DIR")
        hub = needs_hub(entry.cfg or {})
        if hub is not None:
            raise CptError(f"lm-eval task '{name}' downloads dataset '{hub}' from the Hugging Face Hub, and cpt "
                           "eval runs offline; copy the data to a local JSONL file and define the task with "
                           "'dataset_path: json' and 'dataset_kwargs: {data_files: ...}' (see docs/lm-eval.md)")
    return manager


def evaluate(checkpoint: Path, tasks: list[str], include: list[Path] = (), out: Path | None = None,
             limit: int | None = None, batch_size: int = 8, device: str | None = None) -> Path:
    """Run the harness on ``checkpoint`` for ``tasks`` and write its results as JSON; returns the path."""
    offline()
    try:
        import lm_eval
    except ImportError:
        raise CptError("lm-eval is not installed; install it with: pip install 'lm-eval>=0.4.5'") from None
    import torch

    checkpoint = checkpoint.resolve()
    if not tasks:
        raise CptError("--lm-eval needs at least one task name, e.g. --lm-eval cpt_upstream,cpt_downstream")
    run_dir, label = locate(checkpoint)
    include = [p.resolve() for p in include]
    if run_dir is not None:
        include = [write_heldout_tasks(run_dir), *include]
    manager = task_manager(tasks, include)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    started = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(checkpoint), "dtype": dtype},
                                          tasks=tasks, task_manager=manager, batch_size=batch_size, device=device,
                                          limit=limit, log_samples=False)
    except ConnectionError as e:  # a group or an included task that reaches for the Hub after all
        raise CptError(f"lm-eval tried to reach the Hugging Face Hub ({e}); cpt eval runs offline: define the "
                       "task over local files (see docs/lm-eval.md)") from None
    record = {"checkpoint": str(checkpoint), "tasks": tasks, "limit": limit, "device": device, "dtype": dtype,
              "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
              "seconds": round(time.perf_counter() - started, 3), "results": results["results"],
              "n_samples": results.get("n-samples"), "configs": results.get("configs")}
    if out is None:
        out = (run_dir / "lm_eval" / f"{label}.json") if run_dir is not None else Path("lm_eval") / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(out)
    return out


def summary(path: Path) -> str:
    """The headline numbers of a results file, one line per task."""
    record = json.loads(path.read_text())
    lines = []
    for task, metrics in record["results"].items():
        values = [f"{k.split(',')[0]} {v:.4g}" for k, v in metrics.items()
                  if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"]
        lines.append(f"{task}: " + ", ".join(values))
    return "\n".join(lines)
