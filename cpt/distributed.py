"""The distributed engine of a run: DDP (Accelerate's default) or DeepSpeed ZeRO, chosen by the recipe's
``distributed`` block and built through Accelerate.

cpt keeps the optimizer, the learning rate and the accumulation arithmetic in its own loop; DeepSpeed gets
a generated configuration that only states the batch shape, clipping, precision and the ZeRO stage (or a
user's file with those filled in). The engine is rebuilt at every stage start, from a plain model holding
full fp32 weights, so the anti-forgetting methods (which rewrite the model between stages) see the same
model under every engine.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from cpt.config import check, field
from cpt.errors import CptError

log = logging.getLogger(__name__)

# A checkpoint's DeepSpeed part: ``<checkpoint>/deepspeed/state/`` as written by ``engine.save_checkpoint``.
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"

# Keys of a user's DeepSpeed file that cpt sets itself, with the recipe key that decides each.
OWNED_KEYS = {"train_micro_batch_size_per_gpu": "train.micro_batch", "gradient_accumulation_steps": "train.grad_accum",
              "gradient_clipping": "train.grad_clip"}
REFUSED_SECTIONS = {"optimizer": "cpt builds AdamW from train.* itself",
                    "scheduler": "cpt sets the learning rate every step from the stage's schedule",
                    "fp16": "fp16 loss scaling skips steps on overflow; use train.mixed_precision: bf16"}


@dataclass
class DistributedConfig:
    engine: Literal["ddp", "deepspeed"] = field(
        "ddp", doc="ddp: every rank holds the whole model (Accelerate's default); deepspeed: ZeRO sharding")
    zero_stage: int = field(2, doc="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights")
    offload_optimizer: bool = field(False, doc="DeepSpeed: keep optimizer state (and its update) in CPU memory")
    offload_params: bool = field(False, doc="DeepSpeed ZeRO-3: keep weights in CPU memory between uses")
    deepspeed_config: Optional[str] = field(
        None, doc="a DeepSpeed JSON to start from (relative to the recipe); cpt fills batch size, clipping and "
                  "precision from train.* and refuses optimizer/scheduler/fp16 sections")

    def __post_init__(self):
        deepspeed = self.engine == "deepspeed"
        check(self.zero_stage in (1, 2, 3), "zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        for key in ("offload_optimizer", "offload_params", "deepspeed_config"):
            check(deepspeed or getattr(self, key) in (False, None), key,
                  f"is a DeepSpeed option; set distributed.engine: deepspeed or remove {key}")
        check(deepspeed or self.zero_stage == 2, "zero_stage",
              "is a DeepSpeed option; set distributed.engine: deepspeed or remove zero_stage")
        check(not self.offload_params or self.zero_stage == 3, "offload_params",
              "offloads the weights ZeRO-3 shards; set zero_stage: 3 or use offload_optimizer only")

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"


# What each method needs that ZeRO-3 takes away: the whole weights on every rank, at every step.
ZERO3_REFUSED = {
    "lora": "LoRA wraps and finally merges into whole weight matrices, which ZeRO-3 keeps split across ranks",
    "l2_init": "the L2 pull reads every whole weight at every step, which ZeRO-3 keeps split across ranks",
}


def check_stages(config: DistributedConfig, stages, mixed_precision: str) -> None:
    """Refuse at validation what cannot run under the chosen engine (raised as ``ConfigValueError``)."""
    if not config.deepspeed:
        return
    check(mixed_precision != "fp16", "train.mixed_precision",
          "fp16 under DeepSpeed uses loss scaling, which skips steps on overflow; use bf16 (or no)")
    if config.zero_stage != 3:
        return
    for i, stage in enumerate(stages):
        for key, why in ZERO3_REFUSED.items():
            check(getattr(stage, key) is None, f"stages[{i}].{key}",
                  f"does not combine with DeepSpeed ZeRO-3: {why}; use distributed.zero_stage: 2 (shards optimizer "
                  "state and gradients, keeps whole weights) or engine: ddp")
        check(stage.reset_optimizer, f"stages[{i}].reset_optimizer",
              "false does not combine with DeepSpeed ZeRO-3: the engine is rebuilt from gathered weights at each "
              "stage boundary; use zero_stage: 2 to keep the previous stage's optimizer state")


def deepspeed_config(config: DistributedConfig, train, precision: str, base_dir: Path) -> dict:
    """The DeepSpeed configuration for a run: the user's file (if any) with cpt's batch shape, clipping,
    precision and ZeRO settings. ``train_batch_size`` is left to DeepSpeed (micro x accum x world).

    Raises:
        CptError: an unreadable file, or one that sets what the recipe decides (naming the recipe key).
    """
    ds: dict = {}
    if config.deepspeed_config:
        path = Path(config.deepspeed_config).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            ds = json.loads(path.read_text())
        except OSError:
            raise CptError(f"distributed.deepspeed_config: cannot read '{path}'; give the path of a DeepSpeed JSON "
                           "file (relative to the recipe)") from None
        except ValueError as e:
            raise CptError(f"distributed.deepspeed_config: '{path}' is not valid JSON ({e})") from None
        for key, why in REFUSED_SECTIONS.items():
            if key in ds and (key != "fp16" or ds[key].get("enabled", False) not in (False, "auto")):
                raise CptError(f"distributed.deepspeed_config: '{path}' has a '{key}' section, but {why}; remove it")
    for key, recipe_key in OWNED_KEYS.items():
        value = getattr(train, recipe_key.removeprefix("train."))
        if ds.get(key, "auto") not in ("auto", value):
            raise CptError(f"distributed.deepspeed_config: {key} is {ds[key]!r} but {recipe_key} is {value}; "
                           f"remove it from the file or set it to \"auto\" (the recipe decides)")
        ds[key] = value
    if ds.get("train_batch_size", "auto") == "auto":
        ds.pop("train_batch_size", None)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", config.zero_stage) != config.zero_stage:
        raise CptError(f"distributed.deepspeed_config: zero_optimization.stage is {zero['stage']} but "
                       f"distributed.zero_stage is {config.zero_stage}; make them agree")
    zero["stage"] = config.zero_stage
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds.setdefault("zero_allow_untested_optimizer", True)  # cpt's torch AdamW
    ds.setdefault("steps_per_print", 2**31 - 1)  # cpt logs its own steps
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def make_accelerator(recipe, precision: str, base_dir: Path):
    """The run's Accelerator: DDP by default, DeepSpeed with the generated configuration.

    On a machine without a GPU, several processes talk over gloo (``cpu=True`` for DDP; for DeepSpeed the
    process group is named explicitly, or Accelerate would count one process while DeepSpeed sees all).
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    if not recipe.distributed.deepspeed:
        return Accelerator(mixed_precision=precision, cpu=not gpu)
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe.distributed, recipe.train, precision, base_dir))
    handlers = [] if gpu else [InitProcessGroupKwargs(backend="gloo")]
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # the recipe decides, whatever a launcher exported
    return Accelerator(mixed_precision=precision, deepspeed_plugin=plugin, kwargs_handlers=handlers)


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def full_state_dict(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole state dict (on the CPU), with fp32 master values where DeepSpeed keeps them (bf16
    training keeps bf16 copies in the model). Collective: every rank must call it; ranks with ``keep=False``
    take part in the gathering but hold no copy and get an empty dict (a checkpoint needs rank 0's only)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keys = set(module.state_dict())  # persistent entries only, as save_pretrained writes them
    state = {}
    for name, param in module.named_parameters():
        value = safe_get_full_fp32_param(param) if param.requires_grad else None
        if value is None:  # frozen, or no master copy: the model's own (gathered under ZeRO-3)
            with deepspeed.zero.GatheredParameters([param]):
                value = param.detach().clone()
        if keep:
            state[name] = value.cpu()
    if keep:
        state.update({name: b.detach().cpu() for name, b in module.named_buffers() if name in keys})
    return state


def plain_module(engine, dtype: torch.dtype) -> torch.nn.Module:
    """The engine's model as a plain module with its whole weights (the fp32 master values, cast to
    ``dtype``), ready for the next stage's methods and engine. ZeRO-3 split its module's weights, so a new
    model is built from the gathered ones; under ZeRO-1/2 the module stays, restored from the master copies."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full_state_dict(engine).items()}
    module = engine.module
    if hasattr(next(module.parameters()), "ds_id"):
        with torch.device("meta"):
            fresh = type(module)(module.config)
        fresh.to_empty(device=engine.device)
        fresh.tie_weights()
        with torch.no_grad():  # buffers are never split; non-persistent ones (rotary tables) are not in state
            for name, buffer in fresh.named_buffers():
                buffer.copy_(module.get_buffer(name))
        module = fresh
    module.to(device=engine.device, dtype=dtype)
    module.load_state_dict(state, strict=False)
    return module
