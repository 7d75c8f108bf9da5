"""The training loop: stages in order, each with its own mixture and LR schedule, on Accelerate.

Accumulation, clipping and the learning rate are plain code here; Accelerate only places tensors, wraps
the model for data parallelism, and provides autocast and the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cpt import __version__
from cpt.checkpoint import checkpoint_dir, rng_state, save_checkpoint
from cpt.data.loader import MixtureSampler, PackedSequences, SamplerState, eval_sequences
from cpt.data.prepare import PreparedData
from cpt.errors import NonFiniteLossError
from cpt.evaluate import EvalSet, evaluate
from cpt.metrics import MetricsLogger
from cpt.model import count_parameters, token_loss_sum
from cpt.recipe import Recipe, StageConfig, TrainConfig
from cpt.schedules import lr_at

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The run's counters; with the sampler state they say exactly where training is."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    tokens: int = 0


def build_optimizer(model: torch.nn.Module, train: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(train.beta1, train.beta2), eps=train.eps)


def train_step(model, optimizer, micro_batches: list[torch.Tensor], accelerator, grad_clip: float) -> tuple[float, float]:
    """One optimizer step over accumulated micro-batches of packed ``[B, T+1]`` token windows.

    The loss is normalised by the number of target tokens in the whole step, so accumulation does not change
    its scale. Non-finite loss or gradients raise before the optimizer step, leaving the weights untouched.

    Returns:
        (mean token loss across ranks, gradient norm before clipping).
    """
    step_tokens = sum(b[:, 1:].numel() for b in micro_batches)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        # Only the last micro-batch all-reduces gradients across ranks.
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                micro_loss = token_loss_sum(model, batch[:, :-1], batch[:, 1:])
            accelerator.backward(micro_loss / step_tokens)
        loss_sum += micro_loss.detach()
    loss = accelerator.reduce(loss_sum, "mean").item() / step_tokens
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss is {loss}")
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"gradient norm is {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


class Trainer:
    """Runs a recipe's stages on a prepared model and data, logging metrics and writing checkpoints."""

    def __init__(self, recipe: Recipe, run_dir: Path, model, data: PreparedData, accelerator, metrics: MetricsLogger):
        self.recipe, self.run_dir, self.data = recipe, run_dir, data
        self.accelerator, self.metrics = accelerator, metrics
        self.model = accelerator.prepare(model)
        seq_len = recipe.train.seq_len
        self.sources = {name: PackedSequences(shard.train.tokens, seq_len, name) for name, shard in data.corpora.items()}
        self.eval_sets = {
            name: EvalSet(name, corpus, eval_sequences(data.corpora[corpus].val.tokens, seq_len,
                                                       recipe.eval.max_tokens, corpus),
                          data.corpora[corpus].val.bytes_per_token)
            for name, corpus in recipe.eval.sets.items()
        }
        self.state = TrainState()
        self.sampler_state = SamplerState()
        self.last_checkpoint: Path | None = None
        trainable, total = count_parameters(model)
        log.info("model: %s parameters (%s trainable); %d process(es) on %s, precision %s", f"{total:,}",
                 f"{trainable:,}", accelerator.num_processes, accelerator.device, accelerator.mixed_precision)

    @property
    def global_batch(self) -> int:
        train = self.recipe.train
        return train.micro_batch * train.grad_accum * self.accelerator.num_processes

    def next_micro_batches(self, sampler: MixtureSampler) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch: rank ``r`` takes rows ``r::world`` of each
        accumulation slice, so the union over ranks is the single-process batch."""
        train, world, rank = self.recipe.train, self.accelerator.num_processes, self.accelerator.process_index
        rows, _ = sampler.next_batch(self.global_batch)
        rows = torch.from_numpy(rows).view(train.grad_accum, train.micro_batch * world, -1)
        return [rows[i, rank::world].to(self.accelerator.device) for i in range(train.grad_accum)]

    def dry_run(self) -> None:
        """One forward and backward pass on a full micro-batch, so memory errors show before any training."""
        stage = self.recipe.stages[0]
        sampler = MixtureSampler(self.sources, stage.mixture, self.recipe.run.seed, SamplerState())
        batch = torch.from_numpy(sampler.next_batch(self.recipe.train.micro_batch)[0]).to(self.accelerator.device)
        with self.accelerator.autocast():
            loss = token_loss_sum(self.model, batch[:, :-1], batch[:, 1:])
        self.accelerator.backward(loss / batch[:, 1:].numel())
        self.model.zero_grad(set_to_none=True)

    def fit(self) -> None:
        self.dry_run()
        for index, stage in enumerate(self.recipe.stages):
            self.run_stage(index, stage)

    def run_stage(self, index: int, stage: StageConfig) -> None:
        train, steps = self.recipe.train, self.recipe.train.stage_steps(stage)
        self.state.stage_index, self.state.stage_step = index, 0
        self.sampler_state.stage_index, self.sampler_state.position = index, 0
        sampler = MixtureSampler(self.sources, stage.mixture, self.recipe.run.seed, self.sampler_state)
        # A fresh optimizer per stage (Ibrahim et al. reset optimizer state between datasets).
        optimizer = self.accelerator.prepare(build_optimizer(self.model, train, stage.schedule.peak_lr))
        log.info("stage %d '%s': %d steps of %d x %d tokens, mixture %s", index, stage.name, steps,
                 self.global_batch, train.seq_len, ", ".join(f"{k} {v:g}" for k, v in stage.mixture.items()))
        self.metrics.log({"kind": "stage", "event": "start", "stage": stage.name, "index": index,
                          "step": self.state.global_step})
        self.evaluate_all(stage)
        progress = self._progress(stage, steps)
        for t in range(1, steps + 1):
            lr = lr_at(stage.schedule, t, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            micro_batches = self.next_micro_batches(sampler)
            try:
                loss, grad_norm = train_step(self.model, optimizer, micro_batches, self.accelerator, train.grad_clip)
            except NonFiniteLossError as e:
                last = self.last_checkpoint or "none yet"
                raise NonFiniteLossError(f"{e} at stage '{stage.name}' step {t}; weights were not updated. Lower "
                                         f"the stage's peak_lr or check its data; last checkpoint: {last}") from None
            step_tokens = self.global_batch * train.seq_len
            self.state.stage_step, self.state.global_step = t, self.state.global_step + 1
            self.state.tokens += step_tokens
            row = {"kind": "train", "step": self.state.global_step, "stage": stage.name, "stage_step": t,
                   "loss": loss, "lr": lr, "tokens": self.state.tokens, "grad_norm": grad_norm,
                   "tokens_per_s": step_tokens / (time.perf_counter() - start)}
            self.metrics.log(row)
            progress(row)
            if t % self.recipe.eval.every == 0 and t < steps:
                self.evaluate_all(stage)
            every = self.recipe.checkpoint.every
            if every and self.state.global_step % every == 0 and t < steps:
                self.save(stage, optimizer, steps)
        self.evaluate_all(stage)
        self.save(stage, optimizer, steps)
        self.metrics.log({"kind": "stage", "event": "end", "stage": stage.name, "index": index,
                          "step": self.state.global_step})

    def evaluate_all(self, stage: StageConfig) -> None:
        parts = []
        for name, eval_set in self.eval_sets.items():
            result = evaluate(self.model, eval_set, self.recipe.eval.batch_size, self.accelerator)
            self.metrics.log({"kind": "eval", "step": self.state.global_step, "stage": stage.name,
                              "stage_step": self.state.stage_step, "set": name, "corpus": eval_set.corpus, **result})
            parts.append(f"{name} {result['loss']:.3f} (bpb {result['bpb']:.3f})")
        if parts:
            log.info("eval @ step %d (%s %d): %s", self.state.global_step, stage.name, self.state.stage_step,
                     " | ".join(parts))

    def save(self, stage: StageConfig, optimizer, steps: int) -> None:
        target = checkpoint_dir(self.run_dir, stage.name, self.state.global_step)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            train_state = {"optimizer": optimizer.state_dict(), "counters": asdict(self.state),
                           "sampler": asdict(self.sampler_state), "rng": rng_state()}
            meta = {"run": self.recipe.name, "stage": stage.name, **asdict(self.state), "stage_steps": steps,
                    "stage_complete": self.state.stage_step == steps, "world_size": self.accelerator.num_processes,
                    "recipe_fingerprint": self.recipe.fingerprint(),
                    "tokenizer_fingerprint": self.data.tokenizer_fingerprint, "cpt_version": __version__}
            save_checkpoint(target, self.accelerator.unwrap_model(self.model), self.data.tokenizer, train_state,
                            meta, self.recipe.to_dict())
            log.info("checkpoint: %s", target)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = target

    def _progress(self, stage: StageConfig, steps: int):
        """A progress bar on a terminal; plain log lines every ``train.log_every`` steps otherwise."""
        if not self.accelerator.is_main_process:
            return lambda row: None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=stage.name, unit="step", leave=True)

            def update(row):
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if row["stage_step"] == steps:
                    bar.close()
            return update

        def line(row):
            if row["stage_step"] % self.recipe.train.log_every == 0 or row["stage_step"] == steps:
                log.info("%s step %d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s", stage.name, row["stage_step"],
                         steps, row["loss"], row["lr"], row["grad_norm"], row["tokens_per_s"])
        return line
