"""The model: a small Llama built from scratch, or any local Hugging Face causal LM; and the token loss."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from cpt.config import check, field
from cpt.errors import CptError

log = logging.getLogger(__name__)


@dataclass
class ArchConfig:
    family: Literal["llama"] = field("llama", doc="architecture of a scratch model")
    layers: int = field(4, doc="transformer layers")
    hidden: int = field(256, doc="hidden size")
    heads: int = field(4, doc="attention heads")
    kv_heads: Optional[int] = field(None, doc="key/value heads (grouped-query attention; default: heads)")
    intermediate: Optional[int] = field(None, doc="MLP size (default: 8/3 * hidden, rounded up to 64)")
    tie_embeddings: bool = field(True, doc="share input and output embeddings")
    rope_theta: float = field(10000.0, doc="rotary embedding base")

    def __post_init__(self):
        for key in ("layers", "hidden", "heads"):
            check(getattr(self, key) > 0, key, "must be a positive integer")
        check(self.hidden % self.heads == 0, "heads", f"must divide hidden={self.hidden}")
        if self.kv_heads is not None:
            check(self.kv_heads > 0 and self.heads % self.kv_heads == 0, "kv_heads",
                  f"must be a positive divisor of heads={self.heads}, got {self.kv_heads}")
        check(self.intermediate is None or self.intermediate > 0, "intermediate", "must be a positive integer")


@dataclass
class ModelConfig:
    init: str = field("scratch", doc="'scratch' to build from `arch`, or a local Hugging Face model directory")
    arch: Optional[ArchConfig] = field(None, doc="architecture, required when init is 'scratch'")
    resize_embeddings: bool = field(False, doc="resize the model's embeddings to the tokenizer's vocabulary")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = field(
        "auto", doc="attention kernel: auto = flash_attention_2 where the flash_attn package and a CUDA device are "
                    "present, else sdpa; one that cannot run here falls back to sdpa with a log line")

    def __post_init__(self):
        check(self.init != "scratch" or self.arch is not None, "arch", "required when model.init is 'scratch'")
        check(self.init == "scratch" or self.arch is None, "arch",
              "only for model.init: scratch; a pretrained model brings its own architecture")


def build_model(config: ModelConfig, tokenizer, seq_len: int, base_dir: Path) -> torch.nn.Module:
    """Build or load the model (fp32 weights; mixed precision is applied by the trainer).

    Raises:
        CptError: a missing model directory, or a tokenizer whose vocabulary does not fit the embeddings.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from cpt.kernels import resolve_attention

    vocab = len(tokenizer)
    attention = resolve_attention(config.attn_implementation)
    log.info("attention: %s", attention)
    if config.init == "scratch":
        arch = config.arch
        intermediate = arch.intermediate or -(-int(arch.hidden * 8 / 3) // 64) * 64
        hf_config = LlamaConfig(
            vocab_size=vocab, hidden_size=arch.hidden, intermediate_size=intermediate,
            num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads or arch.heads, max_position_embeddings=seq_len,
            tie_word_embeddings=arch.tie_embeddings, rope_theta=arch.rope_theta,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation=attention,
        )
        return LlamaForCausalLM(hf_config)
    path = Path(config.init).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not (path / "config.json").is_file():
        raise CptError(f"model.init '{config.init}' is not a local Hugging Face model directory (no config.json "
                       f"in {path}); use 'scratch' or a directory written by save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                     attn_implementation=attention)
    except (OSError, ValueError) as e:
        raise CptError(f"could not load model from '{path}': {str(e).splitlines()[0]}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if config.resize_embeddings and rows != vocab:
        log.info("resizing embeddings %d -> %d to match the tokenizer", rows, vocab)
        model.resize_token_embeddings(vocab)
    elif vocab > rows or rows - vocab >= 128:
        raise CptError(f"tokenizer has {vocab} tokens but the model's embeddings have {rows} rows; use the model's "
                       "own tokenizer, or set model.resize_embeddings: true to resize them")
    _check_positions(model, seq_len, path)
    return model


def _check_positions(model: torch.nn.Module, seq_len: int, path: Path) -> None:
    """Refuse a ``seq_len`` beyond a pretrained model's positions when they are learned (GPT-2's ``wpe`` would
    index past its table); warn when they are rotary (Llama runs, but past the context it was trained on)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or seq_len <= positions:
        return
    if any("rotary" in name for name, _ in model.named_modules()):
        log.warning("train.seq_len %d is longer than the %d positions %s was trained on: rotary positions "
                    "extrapolate poorly; set rope_scaling in its config.json to extend the context on purpose",
                    seq_len, positions, path)
        return
    raise CptError(f"train.seq_len {seq_len} is longer than the {positions} positions of {path}'s position "
                   f"embeddings; set train.seq_len to {positions} or less")


def _loss_chunk_rows(logits_NV: torch.Tensor) -> int:
    """Rows of logits per chunk of ``ChunkedCrossEntropy``: about 2 MiB of fp32 on a CPU, so that a chunk's upcast
    copy is still in the core's cache when the softmax reduction reads it back (2**19 elements measured fastest
    of 2**16..2**22 for vocabularies of 4,096 and 32,000 on this project's CPU machine, 3x the unchunked loss);
    256 MiB on an accelerator, where launches, not caches, set the cost (unmeasured there)."""
    budget = 2**19 if logits_NV.device.type == "cpu" else 2**26
    return max(1, budget // logits_NV.shape[-1])


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``[N, V]`` logits (any float dtype) computed in fp32, a chunk of rows at a time.

    Same value and gradient as ``F.cross_entropy(logits.float(), labels, reduction="sum")`` (which the HF models
    compute), up to float rounding, without its whole-size fp32 tensors: the forward keeps only each row's
    log-sum-exp, and the backward writes ``softmax - onehot`` straight into a gradient of the logits' dtype.
    Negative labels (``F.cross_entropy``'s ``ignore_index``) add nothing and get no gradient."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits_NV.device.type, enabled=False):
            return ChunkedCrossEntropy._forward(ctx, logits_NV, labels_N)

    @staticmethod
    def _forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        rows = _loss_chunk_rows(logits_NV)
        kept_N = labels_N >= 0
        safe_N = labels_N.clamp_min(0)
        total = torch.zeros((), dtype=torch.float32, device=logits_NV.device)
        lse_N = torch.empty(labels_N.shape, dtype=torch.float32, device=logits_NV.device)
        for start in range(0, logits_NV.shape[0], rows):
            chunk = slice(start, start + rows)
            upcast = logits_NV[chunk].float()
            torch.logsumexp(upcast, dim=-1, out=lse_N[chunk])
            target = upcast.gather(1, safe_N[chunk, None]).squeeze(1)
            total += torch.where(kept_N[chunk], lse_N[chunk] - target, 0.0).sum()
        ctx.save_for_backward(logits_NV, safe_N, kept_N, lse_N)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits_NV, safe_N, kept_N, lse_N = ctx.saved_tensors
        rows = _loss_chunk_rows(logits_NV)
        scale_N = kept_N.float() * grad
        grad_NV = torch.empty_like(logits_NV)
        for start in range(0, logits_NV.shape[0], rows):
            chunk = slice(start, start + rows)
            softmax = logits_NV[chunk].float().sub_(lse_N[chunk, None]).exp_()
            softmax.scatter_add_(1, safe_N[chunk, None], softmax.new_full((softmax.shape[0], 1), -1.0))
            grad_NV[chunk] = softmax.mul_(scale_N[chunk, None])
        return grad_NV, None


def cross_entropy_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over every target token, in fp32 (``ChunkedCrossEntropy``)."""
    return ChunkedCrossEntropy.apply(logits_BTV.flatten(0, 1), labels_BT.flatten())


def _cross_entropy_sum_whole(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """``cross_entropy_sum`` as one fp32 ``F.cross_entropy``: what ``torch.compile`` fuses best."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), reduction="sum")


def cross_entropy_for(train, device: torch.device | None = None, shards_weights: bool = False):
    """The training loss for ``train.loss`` (``cpt.kernels``): ``loss(model, inputs_BT, labels_BT, need_logits)
    -> (summed cross-entropy, logits or None)``. The chunked kind applies ``cross_entropy_sum`` to the logits;
    under ``train.compile`` the whole-tensor form, compiled, so that the fp32 upcast of the logits fuses into
    the softmax reduction (the HF models compute their loss inside the compiled forward for the same reason;
    compiled it is as fast as the chunked loss eager). ``fused_linear`` where it can run on ``device``."""
    from cpt.kernels import FusedLinearLoss, LogitsLoss, resolve_loss

    chunked = LogitsLoss(torch.compile(_cross_entropy_sum_whole, dynamic=False) if train.compile else cross_entropy_sum)
    loss = FusedLinearLoss(chunked) if resolve_loss(train.loss, device or torch.device("cpu"),
                                                    shards_weights) == "fused_linear" else chunked
    log.info("loss: %s%s", loss.name, " (compiled)" if train.compile and loss is chunked else "")
    return loss


def token_loss_sum(model: torch.nn.Module, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ``model`` over every target token (no KV cache: nothing generates)."""
    return cross_entropy_sum(model(input_ids=input_ids_BT, use_cache=False).logits, labels_BT)


@contextmanager
def fp32_output_head(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the output head (``get_output_embeddings()``, a Linear) computes its logits in fp32 with
    autocast off, from the fp32 hidden state that reaches it: under bf16 autocast the logits would otherwise be
    rounded to bf16 (8 bits of mantissa). On SmolLM2-135M that moved the loss by at most 0.0012 nats
    (docs/results.md); the head makes the evaluated logits exact whatever the bf16 kernels do. A head that is not
    a Linear (a wrapped one, none) is left as it is."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(head, torch.nn.Linear) or "forward" in vars(head):
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def apply_speed_options(model: torch.nn.Module, train) -> None:
    """``train.activation_checkpointing`` and ``train.compile``, in place: the module stays the same object, so
    Accelerate, the engines and checkpoints see the model they always do.

    Checkpointing is the non-reentrant kind (works with frozen inputs, LoRA and ``no_sync``); only the training
    forward recomputes (it is off in eval mode). ``nn.Module.compile`` compiles the module's call; shapes are
    static per (batch, length), so the training and the evaluation batch each compile once per stage."""
    if train.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if train.compile:
        model.compile(dynamic=False)
    applied = [name for name, on in (("activation checkpointing", train.activation_checkpointing),
                                     ("torch.compile", train.compile)) if on]
    if applied:
        log.info("model: %s", ", ".join(applied))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; whole counts also for weights that ZeRO-3 has split across ranks."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
