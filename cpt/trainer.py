"""The training loop: stages in order, each with its own mixture and LR schedule, on Accelerate.

Accumulation, clipping and the learning rate are plain code here; Accelerate only places tensors, wraps
the model for data parallelism, and provides autocast and the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cpt import __version__, distributed, preemption
from cpt.checkpoint import (checkpoint_dir, last_sane, list_checkpoints, load_train_state, load_weights, prune,
                            read_meta, rng_state, save_checkpoint, set_rng_state, staging_dir, verify_checkpoint,
                            weight_magnitude)
from cpt.data.batches import draw_micro_batches
from cpt.data.stream import DataStream
from cpt.data.prepare import PreparedData
from cpt.errors import CptError, NonFiniteLossError
from cpt.kernels import LogitsLoss
from cpt.evaluate import build_eval_sets, evaluate
from cpt.metrics import MetricsLogger
from cpt.methods.distill import distill_loss_sum, distill_mask, teacher_forward
from cpt.methods.stage import StageMethods, needs_start_weights
from cpt.methods.stage_merge import average_inputs, merged_weights
from cpt.progress import log_budget, log_stage_end, stage_progress
from cpt.model import (apply_speed_options, count_parameters, cross_entropy_for, cross_entropy_sum,
                       token_loss_sum)
from cpt.optim import build_optimizer, load_optimizer_state, optimizer_state
from cpt.recipe import Recipe, StageConfig
from cpt.schedules import lr_at

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The run's counters; with the sampler state they say exactly where training is."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    tokens: int = 0


def train_step(model, optimizer, micro_batches: list[torch.Tensor], accelerator, grad_clip: float,
               methods: StageMethods | None = None, replay_rows: list[torch.Tensor] | None = None,
               cross_entropy=LogitsLoss(cross_entropy_sum)) -> dict[str, float]:
    """One optimizer step over accumulated micro-batches of packed ``[B, T+1]`` token windows.

    The cross-entropy is normalised by the number of target tokens in the whole step, so accumulation does
    not change its scale. With a stage's methods: ``+ lambda * KL(teacher || student)`` per distilled token
    (``replay_rows`` marks the rows from replay sources) and ``+ lambda * ||theta - theta_0||^2`` once per step.
    Non-finite loss or gradients raise before the optimizer step, leaving the weights untouched.

    Under DeepSpeed ``model`` is its engine: it reduces the gradients at the last micro-batch, clips them to
    ``gradient_clipping`` (set from ``grad_clip``) and skips the update itself when their norm is not finite.
    Under FSDP the loop is the DDP one: Accelerate's ``no_sync`` holds the reduce-scatter to the last
    micro-batch, and the gradient norm is taken over every rank's shards.

    ``cross_entropy`` is the loss ``cross_entropy_for`` picks for ``train.loss`` (default: the chunked loss of the
    logits); it returns the summed cross-entropy and, when ``need_logits``, the logits for distillation.

    Returns:
        ``loss`` (mean token cross-entropy across ranks), ``grad_norm`` (before clipping), and ``kl``/``l2``
        when those methods are active.
    """
    distill = methods.stage.distill if methods is not None and methods.teacher is not None else None
    l2 = methods.l2 if methods is not None else None
    step_tokens = sum(b[:, 1:].numel() for b in micro_batches)
    masks = [distill_mask(distill.tokens, r, b[:, 1:]) for b, r in zip(micro_batches, replay_rows)] if distill else []
    distilled = sum(b[:, 1:].numel() if m is None else int(m.sum()) for b, m in zip(micro_batches, masks))
    sums = {"loss": torch.zeros((), device=accelerator.device), "kl": torch.zeros((), device=accelerator.device)}
    l2_value = None
    deepspeed = distributed.is_deepspeed(accelerator)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Only the last micro-batch all-reduces gradients across ranks (DeepSpeed counts micro-batches itself).
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                inputs_BT, labels_BT = batch[:, :-1], batch[:, 1:]
                ce_sum, logits_BTV = cross_entropy(model, inputs_BT, labels_BT, need_logits=distill is not None)
                objective = ce_sum / step_tokens
                if distill is not None:
                    teacher_BTV = teacher_forward(methods.teacher, inputs_BT)
                    kl_sum, _ = distill_loss_sum(logits_BTV, teacher_BTV, labels_BT, distill, masks[i])
                    objective = objective + distill.lambda_ * kl_sum / max(distilled, 1)
                    sums["kl"] += kl_sum.detach()
                if l2 is not None and last:
                    penalty = l2.penalty(accelerator.unwrap_model(model))
                    objective = objective + penalty
                    l2_value = penalty.detach()
            if deepspeed:
                # The objective is already a per-token mean over the whole step: no division by grad_accum.
                model.backward(objective, scale_wrt_gas=False)
                if not last:
                    model.step()  # a micro-step: DeepSpeed only advances its counter
            else:
                accelerator.backward(objective)
        sums["loss"] += ce_sum.detach()
    reduced = {"loss": accelerator.reduce(sums["loss"], "mean"),
               **({"kl": accelerator.reduce(sums["kl"], "mean")} if distill is not None else {}),
               **({"l2": accelerator.reduce(l2_value, "mean")} if l2_value is not None else {})}
    if deepspeed:
        return _deepspeed_update(model, optimizer, reduced, step_tokens, distilled, distill is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = accelerator.clip_grad_norm_(params, grad_clip or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
    # One host-device sync per step (not one per value): the loss terms and the gradient norm come back
    # together. Clipping before the loss check changes nothing: a non-finite step zeroes the gradients and raises.
    values = [v.float() for v in reduced.values()]
    *host, grad_norm = torch.stack(values + [torch.as_tensor(norm, device=values[0].device).float()]).tolist()
    metrics = _step_metrics(dict(zip(reduced, host)), step_tokens, distilled, distill is not None, optimizer)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"gradient norm is {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": grad_norm}


def _step_metrics(sums: dict[str, float], step_tokens: int, distilled: int, distill: bool, optimizer) -> dict:
    """Per-token loss terms from their sums; raises (gradients dropped) when the objective is not finite."""
    metrics = dict(sums)
    metrics["loss"] /= step_tokens
    if distill:
        metrics["kl"] /= max(distilled, 1)
    total = metrics["loss"] + metrics.get("kl", 0.0) + metrics.get("l2", 0.0)
    if not math.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss is {metrics['loss']}" + (f" (objective {total})" if total != metrics["loss"] else ""))
    return metrics


def _deepspeed_update(engine, optimizer, reduced: dict, step_tokens: int, distilled: int, distill: bool) -> dict:
    """The end of a DeepSpeed step: check the loss, then let the engine reduce, clip and update."""
    values = torch.stack([v.float() for v in reduced.values()]).tolist()
    metrics = _step_metrics(dict(zip(reduced, values)), step_tokens, distilled, distill, optimizer)
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    if not math.isfinite(grad_norm):  # DeepSpeed skipped the update and dropped the gradients
        raise NonFiniteLossError(f"gradient norm is {grad_norm}")
    return {**metrics, "grad_norm": grad_norm}


def reuses_end_eval(previous: StageConfig | None, stage: StageConfig, per_stage_engine: bool) -> bool:
    """Whether a stage's start evaluation would repeat the previous stage's end evaluation exactly: the same
    weights in the same model object. Not after ``start_from`` (other weights), LoRA (merged at the end, added
    at the start) or a per-stage engine (DeepSpeed/FSDP rebuild the model from gathered master weights)."""
    return (previous is not None and stage.start_from is None and previous.lora is None and stage.lora is None
            and not per_stage_engine)


class Trainer:
    """Runs a recipe's stages on a prepared model and data, logging metrics and writing checkpoints."""

    def __init__(self, recipe: Recipe, run_dir: Path, model, data: PreparedData, accelerator, metrics: MetricsLogger,
                 lineage: dict | None = None):
        self.recipe, self.run_dir, self.data, self.lineage = recipe, run_dir, data, lineage
        self.accelerator, self.metrics = accelerator, metrics
        # DeepSpeed and FSDP wrap model and optimizer together, once per stage (``stage_optimizer``).
        self.deepspeed = distributed.is_deepspeed(accelerator)
        self.fsdp = distributed.is_fsdp(accelerator)
        self.per_stage_engine = self.deepspeed or self.fsdp
        self.module_dtype = next(model.parameters()).dtype
        self.model = model if self.per_stage_engine else accelerator.prepare(model)
        seq_len = recipe.train.seq_len
        self.stream = DataStream(data.corpora, recipe.stages, [recipe.train.stage_steps(s) for s in recipe.stages],
                                 seq_len, self.global_batch, recipe.run.seed, recipe.data.max_epochs,
                                 recipe.data.replay_buffer_size, accelerator.num_processes)
        log_budget(self.stream.budget())
        self.eval_sets = build_eval_sets(recipe, data)
        self.cross_entropy = cross_entropy_for(recipe.train, accelerator.device, recipe.distributed.shards_weights)
        self.eval_seconds = 0.0
        self._end_eval: dict[str, dict] | None = None  # the last stage-end results, while the weights are those
        self._stage_clock = (0.0, 0.0)  # (perf_counter, eval seconds) when the current stage began
        self.state = TrainState()
        self.methods: StageMethods | None = None
        # The first stage's starting weights, kept only when resuming it would need them.
        first = recipe.stages[0]
        keep = needs_start_weights(first) or (first.merge is not None and first.merge.kind == "interpolate")
        self.initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep else None
        self.optimizer = None
        self._optimizer_state: dict | None = None  # loaded into the next stage optimizer (resume, branch)
        self.last_checkpoint: Path | None = None
        trainable, total = count_parameters(model)
        engine = recipe.distributed.name if self.per_stage_engine else "DDP"
        train = recipe.train
        log.info("model: %s parameters (%s trainable); %d process(es) on %s (%s), precision %s; global batch %d = "
                 "micro-batch %d x grad_accum %d x %d process(es)", f"{total:,}", f"{trainable:,}",
                 accelerator.num_processes, accelerator.device, engine, accelerator.mixed_precision,
                 self.global_batch, train.micro_batch, train.grad_accum, accelerator.num_processes)

    @property
    def global_batch(self) -> int:
        train = self.recipe.train
        return train.micro_batch * train.grad_accum * self.accelerator.num_processes

    def next_micro_batches(self, stage: StageConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``draw_micro_batches`` from this run's stream."""
        return draw_micro_batches(self.stream, stage, self.recipe.train.grad_accum, self.accelerator)

    def dry_run(self) -> None:
        """One forward and backward pass on a full micro-batch, so memory errors show before any training.
        Not under DeepSpeed or FSDP: their memory is that of the engine, built when the first stage starts, and
        a backward through a DeepSpeed engine would leave gradients in its buffers."""
        if self.per_stage_engine:
            return
        source = self.stream.sources[self.stream.schedules[0].names[0]]
        rows = source.gather(np.arange(self.recipe.train.micro_batch) % len(source))
        batch = torch.from_numpy(rows).to(self.accelerator.device)
        with self.accelerator.autocast():
            loss = token_loss_sum(self.model, batch[:, :-1], batch[:, 1:])
        self.accelerator.backward(loss / batch[:, 1:].numel())
        self.model.zero_grad(set_to_none=True)

    def fit(self, resume_from: Path | None = None) -> None:
        """Train every stage; with ``resume_from``, continue exactly after that checkpoint of this run."""
        self.dry_run()
        first, start_step = 0, 0
        if resume_from is not None:
            first, start_step = self.restore(resume_from)
        stages = self.recipe.stages
        with preemption.stop_signals():
            for index in range(first, len(stages)):
                self.run_stage(index, stages[index], start_step if index == first else 0)
                if index + 1 < len(stages):
                    self.stop_if_asked(stages[index], self.optimizer, self.recipe.train.stage_steps(stages[index]))

    def carry_over(self, optimizer_state: dict | None, data_state: dict | None) -> None:
        """For a branch: start the first stage with a parent's optimizer state and/or data cursors."""
        self._optimizer_state = optimizer_state
        if data_state is not None:
            self.stream.continue_from(data_state)

    def restore(self, path: Path) -> tuple[int, int]:
        """Load weights, optimizer, counters, data position and RNG from a checkpoint of this run.

        Returns:
            (stage index, completed steps in it) to continue from.
        """
        train_state = load_train_state(path, read_meta(path))
        load_weights(self.accelerator.unwrap_model(self.model), path)
        self.state = TrainState(**train_state["counters"])
        self.stream.load_state_dict(train_state["data"])
        set_rng_state(train_state["rng"])
        self.last_checkpoint = path
        stages = self.recipe.stages
        steps = self.recipe.train.stage_steps(stages[self.state.stage_index])
        log.info("resuming from %s (stage '%s' step %d/%d, global step %d)", path,
                 stages[self.state.stage_index].name, self.state.stage_step, steps, self.state.global_step)
        done = self.state.stage_step == steps
        following = stages[self.state.stage_index + 1] if done and self.state.stage_index + 1 < len(stages) else None
        # A stage's final checkpoint holds that stage's optimizer: the next stage keeps it only when it does not
        # reset its optimizer, as in the uninterrupted run.
        if not done or (following is not None and not following.reset_optimizer):
            self._optimizer_state = optimizer_state(path, train_state)
        return (self.state.stage_index + 1, 0) if done else (self.state.stage_index, self.state.stage_step)

    def stage_optimizer(self, stage: StageConfig):
        """The stage's optimizer: fresh by default (Ibrahim et al. reset optimizer state between datasets), or
        the previous stage's with ``reset_optimizer: false``; a resumed run loads the saved state into it.
        Under DeepSpeed and FSDP a fresh optimizer comes with a new engine around the stage's model."""
        if stage.reset_optimizer or self.optimizer is None:
            module = self.accelerator.unwrap_model(self.model)
            optimizer = build_optimizer(module, self.recipe.train, stage.schedule.peak_lr)
            if self.per_stage_engine:
                self.accelerator.free_memory()  # the previous stage's engine
                self.model, self.optimizer = self.accelerator.prepare(module, optimizer)
            else:
                self.optimizer = self.accelerator.prepare(optimizer)
        if self._optimizer_state is not None:
            engine = "DeepSpeed" if self.deepspeed else "FSDP" if self.fsdp else "DDP"
            load_optimizer_state(self.model, self.optimizer, self._optimizer_state, engine,
                                 self.accelerator.num_processes)
            self._optimizer_state = None
        return self.optimizer

    def run_stage(self, index: int, stage: StageConfig, start_step: int = 0) -> None:
        """One stage: ``begin_stage``, then the step loop (evaluations, checkpoints and stop requests between
        steps), then ``end_stage``."""
        train, steps = self.recipe.train, self.recipe.train.stage_steps(stage)
        optimizer = self.begin_stage(index, stage, start_step, steps)
        progress = stage_progress(stage.name, steps, train.log_every, self.accelerator.is_main_process)
        for t in range(start_step + 1, steps + 1):
            progress(self.train_one(stage, optimizer, t, steps))
            if self.recipe.eval.due(t, steps) and t < steps:
                self.evaluate_all(stage)
            every = self.recipe.checkpoint.every
            if every and self.state.global_step % every == 0 and t < steps:
                self.save(stage, optimizer, steps)
            if t < steps:  # a stop asked for during the stage's last step waits for its final checkpoint
                self.stop_if_asked(stage, optimizer, steps)
        self.end_stage(index, stage, optimizer, steps)

    def train_one(self, stage: StageConfig, optimizer, t: int, steps: int) -> dict:
        """Stage step ``t``: set the LR, draw the batch, ``train_step``, the stage's meta-update; logs the row."""
        lr = lr_at(stage.schedule, t, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        micro_batches, replay_rows = self.next_micro_batches(stage)
        try:
            metrics = train_step(self.model, optimizer, micro_batches, self.accelerator, self.recipe.train.grad_clip,
                                 self.methods, replay_rows, self.cross_entropy)
        except NonFiniteLossError as e:
            sane = last_sane(self.run_dir) or "none with sane weights"
            raise NonFiniteLossError(f"{e} at stage '{stage.name}' step {t}; weights were not updated. Lower "
                                     f"the stage's peak_lr or check its data; last sane checkpoint: {sane}") from None
        if self.methods.reptile is not None and self.methods.reptile.step(self.accelerator.unwrap_model(self.model),
                                                                          t, steps):
            metrics["reptile"] = True
        step_tokens = self.global_batch * self.recipe.train.seq_len
        self.state.stage_step, self.state.global_step = t, self.state.global_step + 1
        self.state.tokens += step_tokens
        row = {"kind": "train", "step": self.state.global_step, "stage": stage.name, "stage_step": t, **metrics,
               "lr": lr, "tokens": self.state.tokens, "tokens_per_s": step_tokens / (time.perf_counter() - start)}
        self.metrics.log(row)
        return row

    def begin_stage(self, index: int, stage: StageConfig, start_step: int, steps: int):
        """Position the data (a new stage, or a branch), set up the stage's methods and optimizer, and evaluate
        at a new stage's start; returns the optimizer."""
        self.state.stage_index = index
        if start_step == 0:
            self.state.stage_step = 0
            if stage.start_from is not None:
                self.branch_from(stage.start_from)
            self.stream.start_stage(index)
        self.start_methods(index, stage, resumed=start_step > 0)
        optimizer = self.stage_optimizer(stage)
        mixture = self.stream.schedules[index].mean_weights(steps)
        trainable, total = count_parameters(self.model)
        # AdamW keeps two fp32 moments per trainable parameter.
        sizes = {"trainable_params": trainable, "total_params": total, "optimizer_state_bytes": 8 * trainable}
        engine = distributed.engine_of(self.model)
        log.info("stage %d '%s': %d steps of %d x %d tokens, mixture %s; trainable %s of %s parameters (%.1f%%), "
                 "AdamW state %.1f MiB, engine %s", index, stage.name, steps, self.global_batch,
                 self.recipe.train.seq_len, ", ".join(f"{k} {v:.3g}" for k, v in mixture.items()), f"{trainable:,}",
                 f"{total:,}", 100 * trainable / total, 8 * trainable / 2**20, engine)
        self._stage_clock = time.perf_counter(), self.eval_seconds
        if start_step == 0:
            self.metrics.log({"kind": "stage", "event": "start", "stage": stage.name, "index": index,
                              "step": self.state.global_step, "methods": self.methods.names(), "engine": engine, **sizes})
            previous = self.recipe.stages[index - 1] if index > 0 else None
            reuse = self._end_eval is not None and reuses_end_eval(previous, stage, self.per_stage_engine)
            self.evaluate_all(stage, self._end_eval if reuse else None)
        self._end_eval = None
        return optimizer

    def end_stage(self, index: int, stage: StageConfig, optimizer, steps: int) -> None:
        """Evaluate, log the stage's totals and write its final checkpoint; then finish its methods and hand the
        next stage plain weights (a per-stage engine's model back to whole weights when the next one resets)."""
        end_eval = self.evaluate_all(stage)
        if stage.merge is not None:
            end_eval = self.merge_at_end(index, stage, steps, end_eval)
        started, eval_before = self._stage_clock
        log_stage_end(self.metrics, stage.name, index, self.state.global_step, self.stream.stage_tokens(),
                      time.perf_counter() - started, self.eval_seconds - eval_before)
        self.save(stage, optimizer, steps)  # last, so the checkpoint covers every row of the stage
        module = self.accelerator.unwrap_model(self.model)
        following = self.recipe.stages[index + 1] if index + 1 < len(self.recipe.stages) else None
        if self.per_stage_engine and following is not None and following.reset_optimizer:
            module = distributed.plain_module(self.model, self.module_dtype, self.accelerator.device)
        module = self.methods.finish(module)
        if not self.per_stage_engine:
            self.model = self.accelerator.prepare(module)
        elif module is not self.accelerator.unwrap_model(self.model):
            self.model = module
        self.methods = None
        self._end_eval = end_eval

    def merge_at_end(self, index: int, stage: StageConfig, steps: int, before: dict[str, dict]) -> dict[str, dict]:
        """Replace the stage's end weights by its ``merge``, evaluate them and log a ``merge`` row per eval set."""
        module = self.accelerator.unwrap_model(self.model)
        end = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        start = self.stage_start_state(index, stage) if stage.merge.kind == "interpolate" else None
        paths = (average_inputs(self.run_dir, stage.name, stage.merge.last, self.state.global_step - steps, steps,
                                self.recipe.checkpoint.every) if stage.merge.kind == "average" else [])
        module.load_state_dict(merged_weights(stage.merge, end, start, paths))
        results = {}
        for name, eval_set in self.eval_sets.items():
            results[name] = evaluate(self.model, eval_set, self.recipe.eval.batch_size, self.accelerator)
            self.metrics.log({"kind": "merge", "step": self.state.global_step, "stage": stage.name,
                              "stage_step": self.state.stage_step, "method": stage.merge.kind, "set": name,
                              "loss_before": before[name]["loss"], **results[name]})
        log.info("merge at the end of '%s' (%s): %s", stage.name, stage.merge.describe(), " | ".join(
            f"{name} {before[name]['loss']:.3f} -> {r['loss']:.3f}" for name, r in results.items()))
        return results

    def start_methods(self, index: int, stage: StageConfig, resumed: bool) -> None:
        """Apply the stage's anti-forgetting methods; a resumed stage rebuilds them from its starting weights
        and the checkpoint (LoRA adapters, the HFT selection it recorded)."""
        self.methods = StageMethods(stage, index, self.recipe.run.seed)
        start_state, resume_from, selection = None, None, None
        if resumed:
            resume_from = self.last_checkpoint
            selection = (read_meta(resume_from) or {}).get("methods", {}).get("hft_selection")
            if needs_start_weights(stage):
                start_state = self.stage_start_state(index, stage)
        model = self.methods.setup(self.accelerator.unwrap_model(self.model), start_state, resume_from, selection)
        apply_speed_options(model, self.recipe.train)  # after setup: the teacher is a plain copy
        if not self.per_stage_engine:
            self.model = self.accelerator.prepare(model)
        elif model is not self.accelerator.unwrap_model(self.model):
            self.model = model  # wrapped with a fresh optimizer by stage_optimizer

    def stage_start_state(self, index: int, stage: StageConfig) -> dict[str, torch.Tensor]:
        """The weights a stage started from: its start_from stage's or the previous stage's final checkpoint,
        or the initial model for the first stage."""
        from safetensors.torch import load_file

        if stage.start_from is None and index == 0:
            return self.initial_state
        name = stage.start_from or self.recipe.stages[index - 1].name
        final = [path for meta, path in list_checkpoints(self.run_dir)
                 if meta["stage"] == name and meta.get("stage_complete")]
        if not final:
            raise CptError(f"stage '{name}' has no final checkpoint in {self.run_dir}, needed to resume '{stage.name}'")
        state = load_file(final[-1] / "model.safetensors")
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        return state

    def branch_from(self, name: str) -> None:
        """Restore the weights and data position of stage ``name``'s final checkpoint."""
        final = [path for meta, path in list_checkpoints(self.run_dir)
                 if meta["stage"] == name and meta.get("stage_complete")]
        if not final or verify_checkpoint(final[-1]) is not None:
            raise CptError(f"stage '{name}' has no intact final checkpoint in {self.run_dir} to start from")
        load_weights(self.accelerator.unwrap_model(self.model), final[-1])
        self.stream.load_state_dict(load_train_state(final[-1])["data"])
        log.info("starting from the end of stage '%s' (%s)", name, final[-1])

    def evaluate_all(self, stage: StageConfig, known: dict[str, dict] | None = None) -> dict[str, dict]:
        """Evaluate every eval set and log a row each; ``known`` results (the previous stage's end, on the same
        weights) are logged again for this stage instead of being computed twice. An automatic replay rate
        changes with them (a ``replay`` row)."""
        parts, start, results = [], time.perf_counter(), {}
        for name, eval_set in self.eval_sets.items():
            result = (known or {}).get(name) or evaluate(self.model, eval_set, self.recipe.eval.batch_size,
                                                         self.accelerator)
            results[name] = result
            self.metrics.log({"kind": "eval", "step": self.state.global_step, "stage": stage.name,
                              "stage_step": self.state.stage_step, "set": name, "tag": eval_set.tag,
                              "corpus": eval_set.corpus, **result})
            parts.append(f"{name} {result['loss']:.3f} (bpb {result['bpb']:.3f})")
        self.eval_seconds += time.perf_counter() - start
        replay = self.stream.observe(results)  # an automatic replay rate follows the held set's loss
        if replay is not None:
            self.metrics.log({"kind": "replay", "step": self.state.global_step, "stage": stage.name,
                              "stage_step": self.state.stage_step, **replay})
        if parts:
            log.info("eval @ step %d (%s %d): %s", self.state.global_step, stage.name, self.state.stage_step,
                     " | ".join(parts) + (" (the previous stage's end)" if known else ""))
        return results

    def save(self, stage: StageConfig, optimizer, steps: int) -> None:
        """Write a checkpoint. Under DeepSpeed every rank first writes its ZeRO optimizer shard into the
        checkpoint's staging directory; under FSDP the optimizer state is gathered whole to rank 0. Under
        both the whole weights are gathered for the model files."""
        target = checkpoint_dir(self.run_dir, stage.name, self.state.global_step)
        self.accelerator.wait_for_everyone()
        staging, weights = None, None
        if self.deepspeed:
            staging = staging_dir(target)
            if self.accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.model.save_checkpoint(staging / distributed.DEEPSPEED_DIR, tag=distributed.DEEPSPEED_TAG,
                                       save_latest=False)
        if self.per_stage_engine:
            gathered = distributed.full_state_dict(self.model, every_rank=False)
            weights = {k: v.to(self.module_dtype) if v.is_floating_point() else v for k, v in gathered.items()}
        optimizer_dict = (None if self.deepspeed else distributed.fsdp_optimizer_state(self.model, optimizer)
                          if self.fsdp else optimizer.state_dict())
        if self.accelerator.is_main_process:
            train_state = {"optimizer": optimizer_dict, "counters": asdict(self.state), "metrics_rows": self.metrics.rows,
                           "data": self.stream.state_dict(), "rng": rng_state()}
            meta = {"run": self.recipe.name, "stage": stage.name, **asdict(self.state), "stage_steps": steps,
                    "metrics_rows": self.metrics.rows, "lineage": self.lineage,
                    "stage_complete": self.state.stage_step == steps, "world_size": self.accelerator.num_processes,
                    "engine": self.recipe.distributed.engine,
                    "recipe_fingerprint": self.recipe.fingerprint(),
                    "data_fingerprint": self.stream.fingerprint(self.state.stage_index),
                    "tokenizer_fingerprint": self.data.tokenizer_fingerprint, "cpt_version": __version__}
            meta["methods"] = self.methods.record()
            module = self.accelerator.unwrap_model(self.model)
            meta["max_abs_weight"] = weight_magnitude(weights if weights is not None else module.state_dict())
            model, write_extra = self.methods.checkpoint_parts(module)
            save_checkpoint(target, model, self.data.tokenizer, train_state, meta, self.recipe.to_dict(), write_extra,
                            staging=staging, state_dict=weights if model is module else None)
            log.info("checkpoint: %s", target)
            prune(self.run_dir, self.recipe.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = target

    def stop_if_asked(self, stage: StageConfig, optimizer, steps: int) -> None:
        """At a step boundary: when a stop signal reached any rank, write a checkpoint (unless this step already
        has one) and raise ``Preempted``, so that the process exits and a requeued job resumes from here."""
        if not preemption.stop_agreed(self.accelerator):
            return
        if self.last_checkpoint != checkpoint_dir(self.run_dir, stage.name, self.state.global_step):
            self.save(stage, optimizer, steps)
        if self.accelerator.is_main_process:
            log.warning("stopping on %s at global step %d: checkpoint %s; exit code %d, `cpt run RECIPE --resume` "
                        "continues from it", preemption.received() or "a stop signal on another rank",
                        self.state.global_step, self.last_checkpoint, preemption.EXIT_CODE)
        raise preemption.Preempted(str(self.last_checkpoint))
