"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through peft, as plain
functions over a Hugging Face causal LM.

``apply_lora`` freezes the model and adds rank-``r`` adapters ``W + (alpha / r) * B @ A`` to its linear
layers; ``merge_lora``/``merged_copy`` fold them back into a plain model; ``save_adapters``/``load_adapters``
store and restore the adapter weights alone (safetensors, peft's file names), for checkpoints and resume.

A checkpoint directory that must stay loadable with ``AutoModelForCausalLM.from_pretrained`` keeps its
adapters in a subdirectory (``ADAPTER_DIR``): transformers reads an ``adapter_config.json`` beside
``config.json`` as a peft adapter and would apply it on top of the weights again.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt.config import check, field
from cpt.errors import CptError

ADAPTER_DIR = "lora"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    rank: int = field(8, doc="rank r of each adapter pair A (r x in), B (out x r)")
    alpha: float = field(16.0, doc="scale: the update is (alpha / rank) * B @ A")
    dropout: float = field(0.0, doc="dropout on the adapter's input during training")
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR),
                                      doc="linear layers to adapt, by name or name suffix (e.g. q_proj)")

    def __post_init__(self):
        check(self.rank > 0, "rank", f"must be a positive integer, got {self.rank}")
        check(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.target_modules) > 0, "target_modules", "must name at least one module, e.g. [q_proj, v_proj]")
        check(all(name.strip() and name == name.strip() for name in self.target_modules), "target_modules",
              f"names must be non-empty without surrounding spaces, got {self.target_modules}")
        check(len(set(self.target_modules)) == len(self.target_modules), "target_modules",
              f"lists a module twice: {self.target_modules}")


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target_modules: the full module name, or its dotted suffix.
    return name == target or name.endswith("." + target)


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    modules = dict(model.named_modules())
    linear_suffixes = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items()
                              if isinstance(m, torch.nn.Linear)})
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    for target in targets:
        found = [m for name, m in modules.items() if _matches(name, target)]
        if not found:
            raise CptError(f"lora.target_modules: '{target}' matches no module in the model; linear layers "
                           f"here are named {linear_suffixes}")
        if not all(isinstance(m, torch.nn.Linear) for m in found):
            kinds = sorted({type(m).__name__ for m in found if not isinstance(m, torch.nn.Linear)})
            raise CptError(f"lora.target_modules: '{target}' matches {kinds}, but LoRA here adapts linear layers "
                           f"only; choose among {linear_suffixes}")
        if tied and any(m is output for m in found):
            # Merging into a weight shared with the input embeddings would change those too.
            raise CptError(f"lora.target_modules: '{target}' is the output layer, whose weight is tied to the "
                           "input embeddings; leave it out")


def apply_lora(model: torch.nn.Module, config: LoraConfig, seed: int):
    """Freeze ``model`` and add LoRA adapters to ``config.target_modules``; only the adapters train.

    ``model`` is changed in place (its target layers are wrapped) and returned inside a ``peft.PeftModel``;
    build the optimizer over the returned model afterwards. Adapters start as in Hu et al.: A kaiming-uniform
    from a generator seeded with ``seed``, B zero, so the model's outputs are unchanged at the start and the
    same seed always gives the same adapters. The global RNG states are left as they were.

    Raises:
        CptError: a target module matches nothing or is not a linear layer, or the model already has LoRA.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if is_lora(model):
        raise CptError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    _check_targets(model, config.target_modules)
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.target_modules), bias="none")
    # peft builds the adapter layers with nn.Linear's default init, which draws from the global CPU RNG;
    # fork it so adding LoRA does not shift later random draws, then set the values from our own generator.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a transformers method that transformers 5 deprecates; nothing a user can change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(_lora_layers(peft_model).items()):
            a = module.lora_A["default"].weight
            values = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            a.copy_(values)
            module.lora_B["default"].weight.zero_()
    return peft_model


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` (unwrapped from Accelerate/DDP) carries peft LoRA adapters."""
    from peft import PeftModel

    return isinstance(model, PeftModel) or bool(_lora_layers(model))


def merge_lora(model) -> torch.nn.Module:
    """Fold the adapters into the base weights, in place, and return the plain Hugging Face model.

    The PeftModel must not be used afterwards (its layers are unwrapped). Every parameter of the returned
    model is trainable again, as in a freshly built model, so a following stage trains all of it.
    """
    if not is_lora(model):
        raise CptError("merge_lora: the model has no LoRA adapters")
    plain = model.merge_and_unload()
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def merged_copy(model) -> torch.nn.Module:
    """A merged plain model, leaving ``model`` (adapters, frozen base) untouched: for saving a checkpoint
    mid-stage. Costs one extra copy of the model on its device until the copy is dropped."""
    if not is_lora(model):
        raise CptError("merged_copy: the model has no LoRA adapters")
    return copy.deepcopy(model).merge_and_unload()


def save_adapters(model, path: Path) -> Path:
    """Write the adapter weights (``adapter_model.safetensors``) and ``adapter_config.json`` to ``path``.

    The files are peft's own, so ``peft.PeftModel.from_pretrained(base, path)`` also reads them.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not is_lora(model):
        raise CptError("save_adapters: the model has no LoRA adapters")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(path)
    return path


def load_adapters(model, path: Path) -> None:
    """Load adapter weights saved by ``save_adapters`` into a model from ``apply_lora``, in place.

    The model's base weights must already be those the adapters were trained on (the stage's start).

    Raises:
        CptError: missing files, or adapters whose rank, targets or shapes do not fit the model.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_lora(model):
        raise CptError("load_adapters: the model has no LoRA adapters; call apply_lora first")
    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CptError(f"no LoRA adapters at {path} ({ADAPTER_WEIGHTS} is missing)")
    state = load_file(path / ADAPTER_WEIGHTS)
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise CptError(f"LoRA adapters at {path} do not fit the model (different rank or target_modules?): "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    set_peft_model_state_dict(model, state)
