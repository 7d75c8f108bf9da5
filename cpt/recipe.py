"""The recipe: a run definition in YAML, loaded into typed configs and validated as a whole.

A recipe names corpora, eval sets, a model, a tokenizer and an ordered list of stages. Each stage has its
own step budget, data mixture and LR schedule, and starts from the final weights of the previous stage
(the recipe's model for the first stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cpt.checkpoint import CheckpointConfig
from cpt.config import ConfigValueError, apply_overrides, build, check, field, suggest, to_dict
from cpt.data.replay import ReplayConfig
from cpt.distributed import DistributedConfig, check_stages
from cpt.methods.distill import DistillConfig
from cpt.methods.freezing import HFTConfig
from cpt.methods.l2 import L2InitConfig
from cpt.methods.lora import LoraConfig
from cpt.methods.reptile import ReptileConfig
from cpt.methods.stage_merge import StageMergeConfig, checkpoint_steps
from cpt.data.sources import CorpusConfig
from cpt.data.tokenizer import TokenizerConfig
from cpt.errors import CptError, RecipeError
from cpt.evaluate import EvalConfig
from cpt.metrics import WandbConfig
from cpt.model import ModelConfig
from cpt.schedules import ScheduleConfig

log = logging.getLogger(__name__)


@dataclass
class StageConfig:
    name: str = field(doc="stage name (checkpoints go under checkpoints/<name>/)")
    steps: int = field(doc="optimizer steps in this stage")
    mixture: dict[str, Any] = field(doc="corpus -> weight, or stage step -> {corpus: weight} anchors (a schedule); "
                                        "weights are normalised to sum to 1")
    mixture_interpolation: Literal["linear", "step"] = field(
        "linear", doc="between mixture anchors: linear interpolation, or hold each anchor until the next")
    replay: Optional[ReplayConfig] = field(None, doc="replay earlier data into this stage (see cpt/data/replay.py)")
    start_from: Optional[str] = field(None, doc="an earlier stage whose final weights and data position this stage "
                                                "starts from (default: the stage before)")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, doc="learning-rate schedule of this stage")
    reset_optimizer: bool = field(True, doc="start the stage with fresh AdamW state (false: keep the previous "
                                            "stage's moments)")
    distill: Optional[DistillConfig] = field(None, doc="self-distillation toward the model as it was at the stage's "
                                                       "start (or a named checkpoint)")
    lora: Optional[LoraConfig] = field(None, doc="train LoRA adapters only; merged into the weights at the stage's end")
    hft: Optional[HFTConfig] = field(None, doc="Half Fine-Tuning: freeze half of every layer's matrices by category")
    l2_init: Optional[L2InitConfig] = field(None, doc="pull trainable weights toward their value at the stage's start")
    reptile: Optional[ReptileConfig] = field(None, doc="Reptile/MER: every k steps keep only a beta share of the "
                                                      "interval's weight change (cpt/methods/reptile.py)")
    freeze: list[str] = field(default_factory=list, doc="regexes of parameter names to freeze in this stage")
    merge: Optional[StageMergeConfig] = field(None, doc="at the stage's end, average its last checkpoints or "
                                                        "interpolate toward its start (cpt/methods/stage_merge.py)")

    def __post_init__(self):
        check(self.name.replace("-", "").replace("_", "").isalnum(), "name",
              f"'{self.name}' must be letters, digits, '-' or '_'")
        check(self.steps > 0, "steps", f"must be a positive integer, got {self.steps}")
        self.anchors = _mixture_anchors(self.mixture)
        check(not (self.lora and self.hft), "hft", "choose one of lora and hft for a stage")
        check(not (self.lora and self.l2_init), "l2_init", "L2-to-init applies to full weights; it does not combine "
                                                         "with lora")
        check(not (self.lora and self.merge), "merge", "merges whole weights; it does not combine with lora")
        changes_params = self.lora or self.hft or self.freeze
        check(self.reset_optimizer or not changes_params, "reset_optimizer",
              "false needs the previous stage's trainable parameters; lora, hft and freeze change them")

    @property
    def corpora(self) -> list[str]:
        """Corpora named by the stage's own mixture (replay excluded)."""
        return list(dict.fromkeys(c for weights in self.anchors.values() for c in weights))


def _mixture_anchors(mixture: dict[str, Any]) -> dict[int, dict[str, float]]:
    """``{corpus: weight}`` or ``{step: {corpus: weight}}`` as anchors ``{step: {corpus: weight}}``, validated."""
    check(len(mixture) > 0, "mixture", "must name at least one corpus")
    if all(isinstance(v, dict) for v in mixture.values()):
        anchors = {}
        for key, weights in mixture.items():
            check(str(key).isdigit(), f"mixture.{key}", "a mixture schedule's keys are stage steps (integers >= 0)")
            anchors[int(key)] = _weights(weights, f"mixture.{key}")
        check(0 in anchors, "mixture", f"a mixture schedule needs an anchor at step 0, got steps {sorted(anchors)}")
        return anchors
    return {0: _weights(mixture, "mixture")}


def _weights(weights: dict, where: str) -> dict[str, float]:
    check(len(weights) > 0, where, "must name at least one corpus")
    out = {}
    for corpus, weight in weights.items():
        check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
              and weight >= 0, f"{where}.{corpus}", f"weight must be a number >= 0, got {weight!r}")
        out[str(corpus)] = float(weight)
    check(sum(out.values()) > 0, where, "weights are all zero; give at least one positive weight")
    return out


@dataclass
class DataConfig:
    max_epochs: float = field(10.0, doc="error before training if any source would be read more times than this")
    replay_buffer_size: int = field(10000, doc="sequences kept by buffer replay (reservoir sample of trained data)")
    task_mb: float = field(256.0, doc="preparation: MB of source files per task (one token shard each, kept when "
                                  "prepare is killed; a slurm array task runs several)")

    def __post_init__(self):
        check(self.max_epochs > 0, "max_epochs", "must be positive")
        check(self.replay_buffer_size > 0, "replay_buffer_size", "must be positive")
        check(self.task_mb > 0, "task_mb", "must be a positive number of MB")


@dataclass
class TrainConfig:
    seq_len: int = field(256, doc="tokens per training sequence (packed, no padding)")
    micro_batch: int = field(8, doc="sequences per forward pass on each process")
    grad_accum: int = field(1, doc="micro-batches accumulated per optimizer step")
    max_steps: Optional[int] = field(None, doc="cap on every stage's steps, for quick runs")
    weight_decay: float = field(0.1, doc="AdamW weight decay (not applied to norms and biases)")
    beta1: float = field(0.9, doc="AdamW beta1")
    beta2: float = field(0.95, doc="AdamW beta2")
    eps: float = field(1e-8, doc="AdamW epsilon")
    grad_clip: float = field(1.0, doc="clip the global gradient norm to this (0 = no clipping)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        "auto", doc="autocast precision; auto = bf16 on GPUs that support it, else fp32")
    log_every: int = field(10, doc="print a log line every N steps when not on a terminal")
    activation_checkpointing: bool = field(
        False, doc="recompute each decoder layer's activations in the backward pass instead of keeping them: "
                   "much less activation memory for about a third more compute")
    compile: bool = field(False, doc="torch.compile the model (inductor; ddp engine): the first steps of each stage "
                                     "compile, later ones run the fused kernels")
    loss: Literal["auto", "chunked", "fused_linear"] = field(
        "auto", doc="token loss: chunked = fp32 cross-entropy of the logits a chunk of rows at a time; fused_linear = "
                    "Liger's fused LM-head + cross-entropy, no logits kept (CUDA, liger_kernel, not under ZeRO-3 or "
                    "FSDP); auto = fused_linear where it can run, else chunked, as fused_linear falls back")

    def __post_init__(self):
        for key in ("seq_len", "micro_batch", "grad_accum", "log_every"):
            check(getattr(self, key) > 0, key, "must be a positive integer")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be a positive integer")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for key in ("beta1", "beta2"):
            check(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")

    def stage_steps(self, stage: StageConfig) -> int:
        return min(stage.steps, self.max_steps) if self.max_steps else stage.steps


@dataclass
class RunConfig:
    dir: str = field("runs/{name}", doc="run directory ({name} is the recipe name); relative to the current directory")
    seed: int = field(0, doc="seed of model init and data order")
    data_dir: Optional[str] = field(None, doc="where token shards and a trained tokenizer are cached (default RUN_DIR/data)")


@dataclass
class Recipe:
    name: str = field(doc="recipe name")
    model: ModelConfig = field(doc="the model to start from")
    corpora: dict[str, CorpusConfig] = field(doc="named corpora")
    stages: list[StageConfig] = field(doc="ordered training stages")
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig, doc="tokenizer (default: the model's own)")
    eval: EvalConfig = field(default_factory=EvalConfig, doc="evaluation schedule and named eval sets")
    train: TrainConfig = field(default_factory=TrainConfig, doc="batching, optimizer and precision")
    data: DataConfig = field(default_factory=DataConfig, doc="data budget limits and the replay buffer")
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, doc="checkpoint cadence")
    run: RunConfig = field(default_factory=RunConfig, doc="run directory and seed")
    distributed: DistributedConfig = field(default_factory=DistributedConfig,
                                           doc="engine across processes: ddp, or deepspeed with a ZeRO stage")
    wandb: WandbConfig = field(default_factory=WandbConfig, doc="Weights & Biases logging")

    def __post_init__(self):
        check(len(self.corpora) > 0, "corpora", "define at least one corpus")
        check(len(self.stages) > 0, "stages", "define at least one stage")
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            check(name not in names[:i], f"stages[{i}].name", f"duplicate stage name '{name}'")
        for i, stage in enumerate(self.stages):
            for step, weights in stage.anchors.items():
                where = f"stages[{i}].mixture" + (f".{step}" if len(stage.anchors) > 1 or step else "")
                for source in weights:
                    check(source in self.corpora, f"{where}.{source}",
                          f"unknown corpus{suggest(source, self.corpora)}; corpora: {', '.join(self.corpora)}")
                total = sum(weights.values())
                if abs(total - 1.0) > 1e-6:
                    log.warning("%s: weights sum to %g, normalising to 1", where, total)
                check(step < stage.steps, f"stages[{i}].mixture.{step}",
                      f"anchor step must be below the stage's {stage.steps} steps")
            try:
                stage.schedule.validate_length(stage.steps)
            except ConfigValueError as e:
                raise ConfigValueError(f"stages[{i}].schedule.{e.key}", str(e)) from None
            if stage.start_from is not None:
                check(stage.start_from in names[:i], f"stages[{i}].start_from",
                      f"'{stage.start_from}' is not an earlier stage{suggest(stage.start_from, names[:i])}; "
                      f"earlier stages: {', '.join(names[:i]) or 'none'}")
            if stage.replay and stage.replay.kind != "buffer":
                earlier = [c for s in self.stages[:i] for c in s.corpora]
                for corpus in stage.replay.from_ or []:
                    check(corpus in self.corpora, f"stages[{i}].replay.from",
                          f"unknown corpus '{corpus}'{suggest(corpus, self.corpora)}")
                check(bool(stage.replay.from_ or earlier), f"stages[{i}].replay.from",
                      "nothing to replay in the first stage; name the corpora to replay")
            if stage.replay and stage.replay.hold is not None:
                held = stage.replay.hold.set
                check(held in self.eval.sets, f"stages[{i}].replay.hold.set",
                      f"'{held}' is not an eval set{suggest(held, self.eval.sets)}; rate auto holds the loss of one of "
                      f"eval.sets: {', '.join(self.eval.sets) or 'none'}")
        self._check_merges()
        for set_name, eval_set in self.eval.resolved.items():
            corpus = eval_set.corpus
            key = f"eval.sets.{set_name}" + ("" if isinstance(self.eval.sets[set_name], str) else ".corpus")
            check(corpus in self.corpora, key,
                  f"unknown corpus '{corpus}'{suggest(corpus, self.corpora)}; corpora: {', '.join(self.corpora)}")
        if self.tokenizer.train and self.tokenizer.train.corpora:
            for corpus in self.tokenizer.train.corpora:
                check(corpus in self.corpora, "tokenizer.train.corpora",
                      f"unknown corpus '{corpus}'{suggest(corpus, self.corpora)}")
        check(self.tokenizer.path or self.tokenizer.train or self.model.init != "scratch", "tokenizer",
              "a scratch model needs tokenizer.path or tokenizer.train")
        check_stages(self.distributed, self.stages, self.train)

    def _check_merges(self) -> None:
        """A stage-end average needs its checkpoints on disk; the stage after a merge starts a fresh optimizer."""
        first = 0
        for i, stage in enumerate(self.stages):
            steps = self.train.stage_steps(stage)
            if stage.merge is not None and stage.merge.kind == "average":
                needed = stage.merge.last - 1
                found = len(checkpoint_steps(first, steps, self.checkpoint.every))
                check(found >= needed, f"stages[{i}].merge.last",
                      f"averaging {stage.merge.last} checkpoints needs {needed} mid-stage ones, but checkpoint.every "
                      f"{self.checkpoint.every} gives {found} in this stage; set checkpoint.every or lower last")
                check(self.checkpoint.keep_last >= needed, "checkpoint.keep_last",
                      f"must be >= {needed} so that stages[{i}].merge finds its checkpoints at the stage's end")
            if stage.merge is not None and i + 1 < len(self.stages):
                check(self.stages[i + 1].reset_optimizer, f"stages[{i + 1}].reset_optimizer",
                      f"false does not follow a merge (stages[{i}].merge): the optimizer state fits the unmerged weights")
            first += steps

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir.replace("{name}", self.name))

    def to_dict(self) -> dict:
        return to_dict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, Path]:
    """Load, override and validate a recipe; returns it with the directory its relative paths resolve against.

    Raises:
        CptError: missing or unparsable file; RecipeError naming the key path for invalid content.
    """
    path = Path(path)
    if not path.is_file():
        raise CptError(f"recipe '{path}' does not exist; give the path to a recipe YAML such as recipes/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{path}' is not a text file; give a recipe YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe '{path}' must be a YAML mapping with keys name, model, corpora, stages, ...")
    raw = apply_overrides(raw, list(overrides))
    return build(Recipe, raw), path.resolve().parent
