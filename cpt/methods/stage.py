"""The anti-forgetting methods of one stage, applied to the model when the stage starts and undone when it
ends: freezing by pattern, HFT masks, LoRA adapters, a frozen teacher for self-distillation, the L2 pull
toward the stage's starting weights, and Reptile meta-updates.

"The stage's starting weights" are what the model holds when the stage begins. When a stage is resumed
mid-way the model holds a checkpoint's weights instead, so the caller passes the starting weights
(``start_state``) for the teacher, the L2 reference and the LoRA base.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from cpt.methods.distill import make_teacher, teacher_dtype
from cpt.methods.freezing import apply_trainable, freeze_patterns, hft_selection, selection_summary
from cpt.methods.l2 import L2ToInit
from cpt.methods.lora import ADAPTER_DIR, apply_lora, load_adapters, merge_lora, merged_copy, save_adapters
from cpt.methods.reptile import Reptile

log = logging.getLogger(__name__)


def needs_start_weights(stage) -> bool:
    """Whether resuming this stage mid-way needs its starting weights (teacher, L2 reference, LoRA base)."""
    return stage.distill is not None or stage.l2_init is not None or stage.lora is not None


class StageMethods:
    """Set up and tear down one stage's methods on an unwrapped Hugging Face model.

    Args:
        stage: the stage's config (``freeze``, ``hft``, ``lora``, ``distill``, ``l2_init``, ``reptile``).
        index: stage index (HFT draws a new selection per stage).
        seed: run seed (LoRA adapter init).
    """

    def __init__(self, stage, index: int, seed: int):
        self.stage, self.index, self.seed = stage, index, seed
        self.teacher: torch.nn.Module | None = None
        self.l2: L2ToInit | None = None
        self.reptile: Reptile | None = None
        self.selection: dict[str, bool] | None = None
        self.lora = stage.lora is not None

    def setup(self, model: torch.nn.Module, start_state: dict | None = None, resume_from: Path | None = None,
              selection: dict | None = None) -> torch.nn.Module:
        """Apply the stage's methods; returns the model to train (a peft wrapper for LoRA).

        Args:
            start_state: the stage's starting weights when ``model`` holds other ones (resume).
            resume_from: the checkpoint being resumed (LoRA adapters and the Reptile anchor are loaded from it).
            selection: the HFT selection recorded in that checkpoint (reused, not re-drawn).
        """
        stage = self.stage
        model.requires_grad_(True)
        start = model
        if start_state is not None and needs_start_weights(stage):
            start = copy.deepcopy(model)
            start.load_state_dict(start_state, strict=False)
        if stage.distill is not None:
            if stage.distill.teacher:
                from transformers import AutoModelForCausalLM

                start_teacher = AutoModelForCausalLM.from_pretrained(stage.distill.teacher, local_files_only=True)
            else:
                start_teacher = start
            device = next(model.parameters()).device
            self.teacher = make_teacher(start_teacher, teacher_dtype(stage.distill.teacher_dtype, device)).to(device)
        if stage.hft is not None:
            self.selection = selection or hft_selection(model, stage.hft, self.index)
            apply_trainable(model, self.selection)
            summary = selection_summary(model, self.selection, stage.hft)
            log.info("HFT: training %d of %d targeted matrices", summary["matrices"]["trained"],
                     summary["matrices"]["total"])
        if stage.freeze:
            frozen = freeze_patterns(model, stage.freeze)
            log.info("frozen by pattern: %d parameter tensors", len(frozen))
        if stage.lora is not None:
            if start is not model:  # resume: adapters sit on the stage's starting weights
                model.load_state_dict(start.state_dict())
            model = apply_lora(model, stage.lora, self.seed + self.index)
            if resume_from is not None:
                load_adapters(model, resume_from / ADAPTER_DIR)
        if stage.l2_init is not None:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            self.l2 = L2ToInit(start if start is not model else model, stage.l2_init.lambda_, names=trainable)
        if stage.reptile is not None:
            self.reptile = Reptile(model, stage.reptile)
            if resume_from is not None:
                self.reptile.load(resume_from)
        return model

    def checkpoint_parts(self, model: torch.nn.Module):
        """(model to save at the top level, a writer of extra files) for a checkpoint taken in this stage:
        LoRA saves the merged model (loadable with plain transformers) plus its adapters in ``lora/``; Reptile
        its anchor."""
        if not (self.lora or self.reptile):
            return model, None

        def write_extra(directory: Path) -> None:
            if self.lora:
                save_adapters(model, directory / ADAPTER_DIR)
            if self.reptile is not None:
                self.reptile.save(directory)

        return (merged_copy(model) if self.lora else model), write_extra

    def names(self) -> list[str]:
        """The active methods' recipe keys, e.g. ``["distill", "hft"]`` (replay is part of the mixture)."""
        return [key for key in ("distill", "lora", "hft", "l2_init", "reptile", "freeze") if getattr(self.stage, key)]

    def record(self) -> dict:
        """What resume needs to rebuild the same setup (JSON for ``meta.json``)."""
        return {"hft_selection": self.selection, "lora": self.lora}

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        """End of stage: merge LoRA into the weights, make everything trainable again, drop the teacher."""
        if self.lora:
            model = merge_lora(model)
        model.requires_grad_(True)
        self.teacher = self.l2 = self.reptile = None
        return model
