"""Self-distillation toward a frozen teacher (by default the model as it was at the stage's start).

Each kind is a pure function of student and teacher logits. ``distill_loss_sum`` returns a sum over the
distilled target tokens and their count, so the trainer can normalise by the real number of distilled tokens
across gradient accumulation, as it does for cross-entropy:

    loss = CE_sum / N_ce + lambda * KL_sum / N_distilled        (see ``combine``)

where ``KL_sum`` already carries the ``T^2`` factor of Hinton et al. (2015), which keeps the gradient scale of
the distillation term independent of the temperature.

Kinds (``DistillConfig.kind``):
  * ``full``: forward ``KL(softmax(z_t/T) || softmax(z_s/T))`` over the whole vocabulary.
  * ``topk``: only the teacher's ``top_k`` logits per token are used (what a teacher whose logits were stored
    offline can give). Teacher probabilities are renormalised over those k; student log-probabilities are the
    full-vocabulary ``log_softmax(z_s/T)`` gathered at the k indices, *not* renormalised over them. So the
    student is also pushed to move mass off the other tokens, and the term is not a KL between two
    distributions on the same k outcomes (it is >= the renormalised one, and zero only when the student puts
    all its mass on the k tokens in the teacher's proportions).
  * ``logit_swap`` (Mix-CPT, Jiang et al. 2024): in the teacher's logits swap the ground-truth token's logit
    with the teacher's top-1 logit (no change where the teacher already ranks the ground truth first), then
    forward KL toward ``softmax(swapped/T)``. The teacher then always prefers the right token while keeping
    the shape of its distribution.

Everything is computed in fp32 whatever the input dtype. Target tokens whose label is negative (the
``ignore_index`` convention of ``F.cross_entropy``) are never distilled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from cpt.config import check, field


@dataclass
class DistillConfig:
    lambda_: float = field(1.0, doc="weight of the distillation term: loss = CE + lambda * T^2 * KL (per token)")
    temperature: float = field(1.0, doc="softmax temperature T for teacher and student")
    kind: Literal["full", "topk", "logit_swap"] = field(
        "full", doc="full: KL over the vocabulary; topk: the teacher's top_k logits only; "
                    "logit_swap: Mix-CPT, teacher's top-1 and ground-truth logits swapped")
    top_k: int = field(64, doc="teacher logits kept per token for kind topk")
    tokens: Literal["all", "replay", "new"] = field(
        "all", doc="which sequences are distilled: all, replay sources only, or the stage's new data only")
    teacher: Optional[str] = field(
        None, doc="a checkpoint directory for the teacher (default: the model as it was at the stage's start)")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", doc="teacher precision (auto: bf16 on GPUs that support it, else fp32)")

    def __post_init__(self):
        check(self.lambda_ >= 0, "lambda", f"must be >= 0, got {self.lambda_}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.top_k >= 1, "top_k", f"must be a positive integer, got {self.top_k}")
        default_top_k = DistillConfig.__dataclass_fields__["top_k"].default
        check(self.kind == "topk" or self.top_k == default_top_k, "top_k",
              f"is only used with kind: topk (kind is {self.kind!r}); remove it or set kind: topk")


def _full(student_NV: torch.Tensor, teacher_NV: torch.Tensor, labels_N: torch.Tensor,
          config: DistillConfig) -> torch.Tensor:
    with torch.no_grad():
        teacher_logp_NV = _log_softmax(teacher_NV, config.temperature)
    student_logp_NV = _log_softmax(student_NV, config.temperature)
    return F.kl_div(student_logp_NV, teacher_logp_NV, log_target=True, reduction="sum")


def _topk(student_NV: torch.Tensor, teacher_NV: torch.Tensor, labels_N: torch.Tensor,
          config: DistillConfig) -> torch.Tensor:
    # k larger than the vocabulary keeps every logit: the same as kind full.
    k = min(config.top_k, teacher_NV.shape[-1])
    with torch.no_grad():
        values_NK, index_NK = teacher_NV.topk(k, dim=-1)
        teacher_logp_NK = _log_softmax(values_NK, config.temperature)
    student_logp_NK = _log_softmax(student_NV, config.temperature).gather(-1, index_NK)
    return F.kl_div(student_logp_NK, teacher_logp_NK, log_target=True, reduction="sum")


def _logit_swap(student_NV: torch.Tensor, teacher_NV: torch.Tensor, labels_N: torch.Tensor,
                config: DistillConfig) -> torch.Tensor:
    with torch.no_grad():
        top_N1 = teacher_NV.argmax(dim=-1, keepdim=True)
        truth_N1 = labels_N[:, None]
        top_value_N1 = teacher_NV.gather(-1, top_N1)
        truth_value_N1 = teacher_NV.gather(-1, truth_N1)
        # A copy, so the caller's teacher logits are never modified; where top-1 is the ground truth both
        # writes put back the value that was there.
        swapped_NV = teacher_NV.to(torch.float32, copy=True)
        swapped_NV.scatter_(-1, top_N1, truth_value_N1.float())
        swapped_NV.scatter_(-1, truth_N1, top_value_N1.float())
    return _full(student_NV, swapped_NV, labels_N, config)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # fp32 whatever the input dtype; the fp32 copy and the scaled logits are temporaries freed on return (only
    # the log-probabilities are kept for backward).
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


# Users choose the loss by name (`kind`); the Literal on DistillConfig.kind lists the same names.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DistillConfig], torch.Tensor]] = {
    "full": _full,
    "topk": _topk,
    "logit_swap": _logit_swap,
}


def distill_loss_sum(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    config: DistillConfig,
    token_mask_BT: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``T^2 * KL(p_teacher || p_student)`` over the distilled target tokens, and their count.

    ``logits[b, t]`` predicts ``labels[b, t]`` (already shifted, as in ``cpt.model.token_loss_sum``). The
    teacher logits are detached; gradients reach the student only.

    Args:
        student_logits_BTV: the student's logits, any float dtype.
        teacher_logits_BTV: the teacher's logits for the same inputs, any float dtype.
        labels_BT: target token ids; negative ids are never distilled. Used by kind ``logit_swap``.
        config: the stage's distillation settings (``kind``, ``temperature``, ``top_k``).
        token_mask_BT: bool, True where a target token is distilled (see ``distill_mask``); None: all.

    Returns:
        ``(kl_sum, n)``: an fp32 scalar, zero with a gradient path when no token is distilled, and the int64
        number of distilled tokens.
    """
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(f"student logits {tuple(student_logits_BTV.shape)} and teacher logits "
                         f"{tuple(teacher_logits_BTV.shape)} differ in shape; teacher and student must share "
                         "the tokenizer")
    keep_BT = labels_BT >= 0
    if token_mask_BT is not None:
        keep_BT = keep_BT & token_mask_BT.to(torch.bool)
    teacher_logits_BTV = teacher_logits_BTV.detach()
    if bool(keep_BT.all()):
        # Views, not copies: selecting every row with a mask would copy the logits once more.
        student_NV, teacher_NV = student_logits_BTV.flatten(0, 1), teacher_logits_BTV.flatten(0, 1)
        labels_N = labels_BT.flatten()
    else:
        student_NV, teacher_NV, labels_N = student_logits_BTV[keep_BT], teacher_logits_BTV[keep_BT], labels_BT[keep_BT]
    kl_sum = LOSSES[config.kind](student_NV, teacher_NV, labels_N, config)
    return kl_sum * config.temperature ** 2, keep_BT.sum()


def combine(ce_sum: torch.Tensor, n_ce: int | torch.Tensor, kl_sum: torch.Tensor, n_kl: int | torch.Tensor,
            lambda_: float) -> torch.Tensor:
    """``ce_sum / n_ce + lambda_ * kl_sum / n_kl``; the KL term is zero when nothing was distilled (``n_kl == 0``).

    Pass the counts over the whole optimizer step (all accumulation micro-batches) so that each token weighs
    the same whatever micro-batch it fell in.
    """
    n_kl = torch.as_tensor(n_kl, device=kl_sum.device).clamp(min=1)
    return ce_sum / n_ce + lambda_ * kl_sum / n_kl


def distill_mask(tokens: str, is_replay_B: torch.Tensor, labels_BT: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``token_mask_BT`` for ``DistillConfig.tokens``: None for ``all``, else every target token of the rows
    that come from replay sources (``replay``) or from the stage's new data (``new``)."""
    if tokens == "all":
        return None
    rows_B = is_replay_B.to(torch.bool) if tokens == "replay" else ~is_replay_B.to(torch.bool)
    return rows_B[:, None].to(labels_BT.device).expand_as(labels_BT)


def teacher_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype for ``DistillConfig.teacher_dtype``: ``auto`` is bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def make_teacher(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``model`` in ``dtype``: eval mode, no gradients, no copied ``.grad`` buffers."""
    teacher = copy.deepcopy(model).to(dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    for p in teacher.parameters():
        p.grad = None
    return teacher


def teacher_forward(teacher: torch.nn.Module, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for ``input_ids_BT``, under ``no_grad`` and in eval mode (no dropout).

    ``no_grad`` rather than ``inference_mode``: the logits are saved for the student's backward pass, which
    inference tensors may not be.
    """
    teacher.eval()
    with torch.no_grad():
        return teacher(input_ids=input_ids_BT).logits
