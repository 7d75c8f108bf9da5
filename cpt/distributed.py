"""The distributed engine of a run: DDP (Accelerate's default), DeepSpeed ZeRO or FSDP (PyTorch's FSDP2,
``fully_shard``), chosen by the recipe's ``distributed`` block and built through Accelerate.

cpt keeps the optimizer, the learning rate and the accumulation arithmetic in its own loop; DeepSpeed gets
a generated configuration that only states the batch shape, clipping, precision and the ZeRO stage (or a
user's file with those filled in). The engine is rebuilt at every stage start, from a plain model holding
full fp32 weights, so the anti-forgetting methods (which rewrite the model between stages) see the same
model under every engine.

FSDP checkpoints keep the optimizer state whole, keyed by parameter name (gathered to rank 0 when saving,
re-split by every rank when loading).
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
    engine: Literal["ddp", "deepspeed", "fsdp"] = field(
        "ddp", doc="ddp: every rank holds the whole model (Accelerate's default); deepspeed: ZeRO sharding; "
                   "fsdp: PyTorch FSDP2, weights, gradients and optimizer state sharded per decoder layer")
    zero_stage: int = field(2, doc="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights")
    offload_optimizer: bool = field(False, doc="DeepSpeed: keep optimizer state (and its update) in CPU memory")
    offload_params: bool = field(False, doc="DeepSpeed ZeRO-3: keep weights in CPU memory between uses; fsdp: keep "
                                             "weights, gradients and optimizer state in CPU memory (the update runs there)")
    deepspeed_config: Optional[str] = field(
        None, doc="a DeepSpeed JSON to start from (relative to the recipe); cpt fills batch size, clipping and "
                  "precision from train.* and refuses optimizer/scheduler/fp16 sections")

    def __post_init__(self):
        deepspeed = self.engine == "deepspeed"
        check(self.zero_stage in (1, 2, 3), "zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        check(deepspeed or self.fsdp or not self.offload_params, "offload_params",
              "needs a sharding engine; set distributed.engine: fsdp, or deepspeed with zero_stage: 3")
        for key in ("offload_optimizer", "deepspeed_config"):
            check(deepspeed or getattr(self, key) in (False, None), key,
                  f"is a DeepSpeed option; set distributed.engine: deepspeed or remove {key}")
        check(deepspeed or self.zero_stage == 2, "zero_stage",
              "is a DeepSpeed option; set distributed.engine: deepspeed or remove zero_stage")
        check(not (deepspeed and self.offload_params) or self.zero_stage == 3, "offload_params",
              "offloads the weights ZeRO-3 shards; set zero_stage: 3 or use offload_optimizer only")

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    @property
    def fsdp(self) -> bool:
        return self.engine == "fsdp"

    @property
    def shards_weights(self) -> bool:
        """Whether no rank holds the whole weights while training (ZeRO-3, FSDP)."""
        return self.fsdp or (self.deepspeed and self.zero_stage == 3)

    @property
    def name(self) -> str:
        return {"ddp": "DDP", "fsdp": "FSDP"}.get(self.engine, f"DeepSpeed ZeRO-{self.zero_stage}")


# What each method needs that ZeRO-3 and FSDP take away: the whole weights on every rank, at every step.
SHARDED_REFUSED = {
    "lora": "LoRA wraps and finally merges into whole weight matrices, which it keeps split across ranks",
    "l2_init": "the L2 pull reads every whole weight at every step, which it keeps split across ranks",
}


def check_stages(config: DistributedConfig, stages, train) -> None:
    """Refuse at validation what cannot run under the chosen engine (raised as ``ConfigValueError``)."""
    if config.engine == "ddp":
        return
    check(not train.compile, "train.compile",
          f"is not wired for {config.name.split()[0]} in this version (its engine wraps the model cpt would "
          "compile); use distributed.engine: ddp, or compile: false")
    check(train.mixed_precision != "fp16", "train.mixed_precision",
          f"fp16 under {config.name.split()[0]} needs loss scaling, which skips steps on overflow; use bf16 (or no)")
    for i, stage in enumerate(stages):
        check(stage.merge is None, f"stages[{i}].merge",
              f"does not combine with {config.name.split()[0]} in this version: the merged weights would have to "
              "replace the engine's own copy; use distributed.engine: ddp, or cpt merge after the run")
        check(stage.reptile is None, f"stages[{i}].reptile",
              f"does not combine with {config.name.split()[0]}: its engine keeps the weights the optimizer updates "
              "(DeepSpeed's fp32 master copy, FSDP's shards) out of the meta-update's reach; use distributed.engine: ddp")
    if not config.shards_weights:
        return
    instead = ("use distributed.zero_stage: 2 (shards optimizer state and gradients, keeps whole weights) or engine: "
               "ddp" if config.deepspeed else "use distributed.engine: deepspeed with zero_stage: 2, or engine: ddp")
    for i, stage in enumerate(stages):
        for key, why in SHARDED_REFUSED.items():
            check(getattr(stage, key) is None, f"stages[{i}].{key}",
                  f"does not combine with {config.name}: {why}; {instead}")
        check(stage.reset_optimizer, f"stages[{i}].reset_optimizer",
              f"false does not combine with {config.name}: the engine is rebuilt from gathered weights at each "
              f"stage boundary; {instead} to keep the previous stage's optimizer state")


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
    """The run's Accelerator: DDP by default, DeepSpeed with the generated configuration, or FSDP2.

    On a machine without a GPU, several processes talk over gloo (``cpu=True`` for DDP; for DeepSpeed the
    process group is named explicitly, or Accelerate would count one process while DeepSpeed sees all).
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    config = recipe.distributed
    if config.fsdp:
        return _fsdp_accelerator(config, precision, gpu)
    if not config.deepspeed:
        return Accelerator(mixed_precision=precision, cpu=not gpu)
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(config, recipe.train, precision, base_dir))
    handlers = [] if gpu else [InitProcessGroupKwargs(backend="gloo")]
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # the recipe decides, whatever a launcher exported
    return Accelerator(mixed_precision=precision, deepspeed_plugin=plugin, kwargs_handlers=handlers)


def _fsdp_accelerator(config: DistributedConfig, precision: str, gpu: bool):
    """Accelerate's FSDP2: one ``fully_shard`` unit per decoder layer (the model's ``_no_split_modules``) and
    one for the rest; weights are all-gathered for each unit's forward and backward and resharded after.
    Under bf16 the gathered weights are bf16 and gradients are reduced in fp32, over fp32 sharded masters.

    Accelerate turns FSDP on only for accelerators; on CPU processes (gloo) cpt selects its FSDP path itself,
    so the same ``fully_shard`` code runs in the CPU tests. With one process there is nothing to shard and
    the run is a plain one-process run."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    # Pinned host memory (for asynchronous copies) needs a GPU.
    offload = CPUOffloadPolicy(pin_memory=gpu) if config.offload_params else OffloadPolicy()
    policy = ({"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.bfloat16}
              if precision == "bf16" else None)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        cpu_offload=offload, cpu_ram_efficient_loading=False, mixed_precision_policy=policy,
        state_dict_type="FULL_STATE_DICT")
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    accelerator = Accelerator(mixed_precision=precision, fsdp_plugin=plugin, cpu=not gpu)
    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        from accelerate.state import PartialState

        # Both states, as Accelerate itself ends AcceleratorState's set-up: every later AcceleratorState() (one
        # per AcceleratedOptimizer) copies PartialState's type over its own, and the next stage's prepare
        # would silently wrap the model in DDP instead.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def engine_of(model) -> str:
    """What actually wraps a prepared model: FSDP, DeepSpeed, DDP or none (one process), for the stage's log."""
    if _is_fsdp_module(model):
        return "FSDP"
    return {"DeepSpeedEngine": "DeepSpeed", "DistributedDataParallel": "DDP"}.get(type(model).__name__, "none")


def _is_fsdp_module(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model, every_rank: bool = True) -> dict[str, torch.Tensor]:
    """The whole state dict (on the CPU) of a DeepSpeed engine's or an FSDP model's sharded weights, with
    fp32 master values where DeepSpeed keeps them (bf16 training keeps bf16 copies in the model; FSDP's
    shards are the fp32 masters). Collective: every rank must call it with the same ``every_rank``; when it is
    false only rank 0 keeps a copy and the others get an empty dict (a checkpoint needs rank 0's only)."""
    if _is_fsdp_module(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload: gathered tensor by tensor straight to rank 0's CPU memory, none kept elsewhere.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))
        return {k: v.cpu() for k, v in state.items()}
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    keep = every_rank or torch.distributed.get_rank() == 0
    module = model.module
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


def fsdp_optimizer_state(model, optimizer) -> dict:
    """An FSDP optimizer's whole state keyed by parameter name, on rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_fsdp_optimizer_state(model, optimizer, state: dict) -> None:
    """Split a whole, name-keyed optimizer state (``fsdp_optimizer_state``) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def is_name_keyed(state: dict) -> bool:
    """Whether an optimizer state dict keys its parameters by name (FSDP checkpoints) rather than by index."""
    params = [p for group in state.get("param_groups", []) for p in group.get("params", [])]
    return bool(params) and isinstance(params[0], str)


def plain_module(model, dtype: torch.dtype, device) -> torch.nn.Module:
    """A DeepSpeed engine's or an FSDP model's weights in a plain module with whole weights (the fp32 master
    values, cast to ``dtype``), ready for the next stage's methods and engine. ZeRO-3 and FSDP split the
    module's weights, so a new model is built from the gathered ones; under ZeRO-1/2 the module stays,
    restored from the master copies."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full_state_dict(model).items()}
    fsdp = _is_fsdp_module(model)
    module = model if fsdp else model.module
    if fsdp or hasattr(next(module.parameters()), "ds_id"):
        from torch.distributed.fsdp import FSDPModule

        # fully_shard swaps the module's class for a subclass of FSDPModule and the model's own class.
        cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)) if fsdp else type(module)
        with torch.device("meta"):
            fresh = cls(module.config)
        fresh.to_empty(device=device)
        fresh.tie_weights()
        with torch.no_grad():  # buffers are never split; non-persistent ones (rotary tables) are not in state
            for name, buffer in fresh.named_buffers():
                buffer.copy_(module.get_buffer(name))
        module = fresh
    module.to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=False)
    return module
