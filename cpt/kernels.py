"""Which attention and loss kernels a run uses: the recipe names one (``model.attn_implementation``,
``train.loss``), this module resolves it to one that can run here, and falls back with one log line, never an
error, when the package or the device it needs is missing.

The token loss is a callable ``loss(model, inputs_BT, labels_BT, need_logits)`` returning
``(summed cross-entropy, logits or None)``: ``LogitsLoss`` takes the model's logits and applies
``cpt.model.cross_entropy_sum`` (or its compiled whole-tensor form); ``FusedLinearLoss`` never materialises the
logits, computing the loss from the last hidden states and the LM head's weight with Liger's fused
linear-cross-entropy kernel, inside the model's forward (so DDP and DeepSpeed see an ordinary forward).
"""

from __future__ import annotations

import importlib.util
import logging
import types

import torch

log = logging.getLogger(__name__)

ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")
LOSSES = ("auto", "chunked", "fused_linear")


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_attention(choice: str) -> str:
    """The ``attn_implementation`` to pass to transformers: ``choice``, or sdpa when it cannot run here.

    ``auto`` is flash_attention_2 where the ``flash_attn`` package and a CUDA device are present, else sdpa
    (PyTorch's fused attention, transformers' own default); ``eager`` is the plain matmul-softmax reference.
    """
    flash = _importable("flash_attn") and torch.cuda.is_available()
    if choice == "auto":
        return "flash_attention_2" if flash else "sdpa"
    if choice == "flash_attention_2" and not flash:
        why = "no CUDA device" if _importable("flash_attn") else "the flash_attn package is not installed"
        log.warning("model.attn_implementation flash_attention_2 cannot run here (%s): using sdpa", why)
        return "sdpa"
    return choice


def resolve_loss(choice: str, device: torch.device, shards_weights: bool) -> str:
    """``chunked`` or ``fused_linear`` for ``train.loss``; ``auto`` is fused_linear wherever it can run.

    fused_linear needs a CUDA device, the ``liger_kernel`` package, and the LM head's whole weight inside the
    model's forward (not under ZeRO-3 or FSDP, which hold it sharded outside their own hooks); otherwise the
    chunked loss, with one log line when fused_linear was asked for by name.
    """
    if choice == "chunked":
        return choice
    missing = ("no CUDA device" if device.type != "cuda" else
               "the liger_kernel package is not installed" if not _importable("liger_kernel") else
               "ZeRO-3 and FSDP shard the LM head's weight" if shards_weights else None)
    if missing is None:
        return "fused_linear"
    if choice == "fused_linear":
        log.warning("train.loss fused_linear cannot run here (%s): using the chunked loss", missing)
    return "chunked"


class LogitsLoss:
    """The model's logits, then ``cross_entropy(logits_BTV, labels_BT)`` (chunked, or compiled whole)."""

    name = "chunked"

    def __init__(self, cross_entropy):
        self.cross_entropy = cross_entropy

    def __call__(self, model, inputs_BT: torch.Tensor, labels_BT: torch.Tensor, need_logits: bool = False):
        # use_cache=False: a training forward has no use for the KV cache HF builds by default.
        logits_BTV = model(input_ids=inputs_BT, use_cache=False).logits
        return self.cross_entropy(logits_BTV, labels_BT), logits_BTV


class FusedLinearLoss:
    """Liger's fused linear-cross-entropy: the LM head's matmul and the cross-entropy a chunk of tokens at a time,
    so that no ``[B, T, V]`` logits (nor their gradient) exist; the per-token losses are fp32 and summed. Labels
    below 0 are ignored, as in ``cross_entropy_sum``. A step that needs the logits (self-distillation) takes
    them from ``fallback``."""

    name = "fused_linear"

    def __init__(self, fallback: LogitsLoss, kernel=None):
        self.fallback = fallback
        if kernel is None:
            import inspect

            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            # The LM head's gradient sums over the kernel's token chunks: in fp32 where this Liger lets us say so.
            fp32 = ({"accum_dtype": torch.float32}
                    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters else {})
            kernel = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", **fp32)
        self.kernel = kernel  # kernel(weight_VH, hidden_NH, labels_N) -> summed loss

    def __call__(self, model, inputs_BT: torch.Tensor, labels_BT: torch.Tensor, need_logits: bool = False):
        if need_logits:
            return self.fallback(model, inputs_BT, labels_BT)
        module = model
        while hasattr(module, "module"):  # DDP, DeepSpeed: the forward override lives on the HF model
            module = module.module
        if getattr(module.forward, "__func__", None) is not _fused_forward:
            module.forward = types.MethodType(_fused_forward, module)
            module._cpt_fused_kernel = self.kernel
        out = model(input_ids=inputs_BT, use_cache=False, fused_labels=labels_BT)
        return out.loss, None


def _fused_forward(self, *args, fused_labels: torch.Tensor | None = None, **kwargs):
    """A causal LM's forward that, given ``fused_labels``, returns only the fused loss (``.loss``); without them,
    the class's own forward (evaluation, generation, a distillation teacher copied from this model)."""
    if fused_labels is None:
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hidden_BTH = self.get_decoder()(*args, **kwargs).last_hidden_state
    weight_VH = self.get_output_embeddings().weight
    if torch.is_autocast_enabled(hidden_BTH.device.type):
        # Whether Liger's autograd function runs its matmuls under the caller's autocast depends on its version:
        # give it the autocast dtype, as lm_head would run.
        dtype = torch.get_autocast_dtype(hidden_BTH.device.type)
        hidden_BTH, weight_VH = hidden_BTH.to(dtype), weight_VH.to(dtype)
    labels_N = fused_labels.flatten().masked_fill(fused_labels.flatten() < 0, -100)
    loss = self._cpt_fused_kernel(weight_VH, hidden_BTH.flatten(0, 1), labels_N)
    return CausalLMOutputWithPast(loss=loss.float())
