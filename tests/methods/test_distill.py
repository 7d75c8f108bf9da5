"""Distillation losses against hand-computed values (math/numpy, not the torch code under test)."""

from __future__ import annotations

import math
import types
import typing

import numpy as np
import pytest
import torch

from cpt.config import build
from cpt.errors import RecipeError
from cpt.methods.distill import (
    LOSSES, DistillConfig, combine, distill_loss_sum, distill_mask, make_teacher, teacher_dtype, teacher_forward,
)


def np_softmax(z, T=1.0):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    """KL(p || q) for probability vectors."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(np.sum(p * (np.log(p) - np.log(q))))


def t(rows):
    """A (1, T, V) float32 tensor from a list of T rows."""
    return torch.tensor([rows], dtype=torch.float32)


def loss(student, teacher, labels, mask=None, **config):
    kl, n = distill_loss_sum(student, teacher, torch.tensor([labels]), DistillConfig(**config), mask)
    return kl, n


# Two tokens, vocabulary 4. Token 0: teacher probabilities exactly (0.4, 0.3, 0.2, 0.1) against a uniform
# student; token 1: a peaked teacher against a differently peaked student.
TEACHER = [[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)], [3.0, 1.0, 0.0, 2.0]]
STUDENT = [[0.0, 0.0, 0.0, 0.0], [0.5, 2.0, -1.0, 0.0]]


def test_full_kl_at_temperature_one():
    kl, n = loss(t(STUDENT), t(TEACHER), [0, 1])
    token0 = 0.4 * math.log(0.4 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.25) \
        + 0.1 * math.log(0.1 / 0.25)
    token1 = np_kl(np_softmax(TEACHER[1]), np_softmax(STUDENT[1]))
    assert kl.dtype == torch.float32 and n.item() == 2
    assert kl.item() == pytest.approx(token0 + token1, rel=1e-5)


def test_full_kl_at_temperature_two_has_t_squared_factor():
    kl, n = loss(t(STUDENT), t(TEACHER), [0, 1], temperature=2.0)
    expected = sum(4.0 * np_kl(np_softmax(tt, 2.0), np_softmax(ss, 2.0)) for tt, ss in zip(TEACHER, STUDENT))
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    # The softened distributions are closer: without the T^2 factor the term would be smaller still.
    assert expected / 4.0 < loss(t(STUDENT), t(TEACHER), [0, 1])[0].item()


def test_topk_renormalises_teacher_and_gathers_full_vocab_student():
    teacher = [[2.0, 1.0, 0.0, -1.0, -3.0], [0.0, 0.5, 4.0, 1.0, 3.0]]
    student = [[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    kl, n = loss(t(student), t(teacher), [0, 0], kind="topk", top_k=2)
    expected = 0.0
    for tt, ss, top in zip(teacher, student, [(0, 1), (2, 4)]):
        # Teacher: softmax over its two largest logits only.
        e = [math.exp(tt[i]) for i in top]
        p_t = [x / sum(e) for x in e]
        # Student: log-probabilities over all five tokens, read at the teacher's two indices.
        log_z = math.log(sum(math.exp(x) for x in ss))
        log_p_s = [ss[i] - log_z for i in top]
        expected += sum(p * (math.log(p) - lq) for p, lq in zip(p_t, log_p_s))
    assert n.item() == 2
    assert kl.item() == pytest.approx(expected, rel=1e-5)


def test_topk_with_k_at_least_vocab_equals_full():
    full, _ = loss(t(STUDENT), t(TEACHER), [0, 1])
    topk, _ = loss(t(STUDENT), t(TEACHER), [0, 1], kind="topk", top_k=100)
    assert topk.item() == pytest.approx(full.item(), rel=1e-6)


def test_logit_swap_when_ground_truth_is_not_top1():
    teacher = t([[3.0, 1.0, 0.0, 2.0]])
    before = teacher.clone()
    student = t([[0.5, 2.0, -1.0, 0.0]])
    kl, _ = loss(student, teacher, [2], kind="logit_swap")
    # The ground truth (token 2, logit 0) trades places with the top-1 (token 0, logit 3).
    expected = np_kl(np_softmax([0.0, 1.0, 3.0, 2.0]), np_softmax([0.5, 2.0, -1.0, 0.0]))
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    assert kl.item() != pytest.approx(loss(student, teacher, [2])[0].item(), rel=1e-3)
    assert torch.equal(teacher, before), "the caller's teacher logits must not be modified"


def test_logit_swap_with_temperature():
    kl, _ = loss(t([[0.5, 2.0, -1.0, 0.0]]), t([[3.0, 1.0, 0.0, 2.0]]), [1], kind="logit_swap", temperature=2.0)
    expected = 4.0 * np_kl(np_softmax([1.0, 3.0, 0.0, 2.0], 2.0), np_softmax([0.5, 2.0, -1.0, 0.0], 2.0))
    assert kl.item() == pytest.approx(expected, rel=1e-5)


def test_logit_swap_when_ground_truth_is_top1_equals_full():
    # Token 0 of TEACHER ranks 0 first, token 1 ranks 0 first too.
    swap, _ = loss(t(STUDENT), t(TEACHER), [0, 0], kind="logit_swap")
    full, _ = loss(t(STUDENT), t(TEACHER), [0, 0])
    assert swap.item() == pytest.approx(full.item(), rel=1e-6)


def test_mask_excludes_tokens_from_sum_and_count():
    student, teacher = t(STUDENT), t(TEACHER)
    kl, n = loss(student, teacher, [0, 1], mask=torch.tensor([[False, True]]))
    assert n.item() == 1
    assert kl.item() == pytest.approx(np_kl(np_softmax(TEACHER[1]), np_softmax(STUDENT[1])), rel=1e-5)


@pytest.mark.parametrize("kind", ["full", "topk", "logit_swap"])
def test_all_masked_gives_zero_without_nan(kind):
    student = t(STUDENT).requires_grad_(True)
    kl, n = loss(student, t(TEACHER), [0, 1], mask=torch.zeros(1, 2, dtype=torch.bool), kind=kind,
                 **({"top_k": 2} if kind == "topk" else {}))
    assert kl.item() == 0.0 and n.item() == 0
    total = combine(torch.tensor(3.0), 2, kl, n, lambda_=0.5)
    total.backward()
    assert total.item() == pytest.approx(1.5)
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


def test_negative_labels_are_not_distilled():
    kl, n = loss(t(STUDENT), t(TEACHER), [-100, 0], kind="logit_swap")  # 0 is top-1: no swap
    assert n.item() == 1
    assert kl.item() == pytest.approx(np_kl(np_softmax(TEACHER[1]), np_softmax(STUDENT[1])), rel=1e-5)


@pytest.mark.parametrize("kind", ["full", "topk", "logit_swap"])
def test_zero_when_student_equals_teacher(kind):
    logits = torch.randn(2, 3, 5)
    labels = logits.argmax(-1)  # ground truth = teacher's top-1, so logit_swap changes nothing
    # topk's student log-probs are not renormalised over the k tokens, so it is zero only with k = vocab.
    config = DistillConfig(kind=kind, temperature=1.5, **({"top_k": 5} if kind == "topk" else {}))
    kl, n = distill_loss_sum(logits, logits.clone(), labels, config)
    assert n.item() == 6
    assert abs(kl.item()) < 1e-6


def test_topk_is_positive_when_student_equals_teacher_with_k_below_vocab():
    logits = torch.randn(2, 3, 5)
    kl, _ = distill_loss_sum(logits, logits.clone(), logits.argmax(-1), DistillConfig(kind="topk", top_k=2))
    assert kl.item() > 0


@pytest.mark.parametrize("kind", ["full", "topk", "logit_swap"])
def test_gradients_reach_the_student_only(kind):
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    config = DistillConfig(kind=kind, **({"top_k": 3} if kind == "topk" else {}))
    kl, _ = distill_loss_sum(student, teacher, labels, config)
    kl.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_full_gradient_matches_softmax_difference():
    # d/dz_s of T^2 * KL(p_t || softmax(z_s / T)) = T * (p_s - p_t).
    student = t(STUDENT).requires_grad_(True)
    kl, _ = loss(student, t(TEACHER), [0, 1], temperature=2.0)
    kl.backward()
    for i in range(2):
        expected = 2.0 * (np_softmax(STUDENT[i], 2.0) - np_softmax(TEACHER[i], 2.0))
        np.testing.assert_allclose(student.grad[0, i].numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["full", "topk", "logit_swap"])
def test_bf16_inputs_are_computed_in_fp32(kind):
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 4, 50, generator=gen) * 3).to(torch.bfloat16)
    teacher = (torch.randn(2, 4, 50, generator=gen) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 4), generator=gen)
    config = DistillConfig(kind=kind, temperature=2.0, **({"top_k": 8} if kind == "topk" else {}))
    kl_bf16, _ = distill_loss_sum(student, teacher, labels, config)
    kl_fp32, _ = distill_loss_sum(student.float(), teacher.float(), labels, config)
    assert kl_bf16.dtype == torch.float32
    assert kl_bf16.item() == pytest.approx(kl_fp32.item(), abs=1e-2)


def test_combine_normalises_each_term_by_its_own_count():
    total = combine(torch.tensor(12.0), 4, torch.tensor(6.0), torch.tensor(2), lambda_=0.5)
    assert total.item() == pytest.approx(12.0 / 4 + 0.5 * 6.0 / 2)


def test_distill_mask_selects_rows():
    is_replay = torch.tensor([True, False, True])
    labels = torch.zeros(3, 4, dtype=torch.long)
    assert distill_mask("all", is_replay, labels) is None
    replay = distill_mask("replay", is_replay, labels)
    new = distill_mask("new", is_replay, labels)
    assert replay.tolist() == [[True] * 4, [False] * 4, [True] * 4]
    assert (new == ~replay).all()


def test_losses_registry_matches_config_kinds():
    kinds = typing.get_args(typing.get_type_hints(DistillConfig)["kind"])
    assert set(LOSSES) == set(kinds)


def test_config_builds_with_recipe_key_lambda():
    config = build(DistillConfig, {"lambda": 0.3, "kind": "topk", "top_k": 16, "tokens": "replay"}, "distill")
    assert config.lambda_ == 0.3 and config.top_k == 16 and config.tokens == "replay"


@pytest.mark.parametrize("raw, key", [
    ({"lambda": -1}, "distill.lambda"),
    ({"temperature": 0}, "distill.temperature"),
    ({"kind": "topk", "top_k": 0}, "distill.top_k"),
    ({"kind": "full", "top_k": 8}, "distill.top_k"),
    ({"kind": "kl"}, "distill.kind"),
    ({"tokens": "old"}, "distill.tokens"),
    ({"teacher_dtype": "fp8"}, "distill.teacher_dtype"),
    ({"lamda": 1.0}, "distill.lamda"),
])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(RecipeError) as e:
        build(DistillConfig, raw, "distill")
    assert str(e.value).startswith(key + ":")


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 6)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(6, 7)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.head(self.drop(self.embed(input_ids))))


def test_make_teacher_and_teacher_forward():
    torch.manual_seed(0)
    model = _TinyLM().train()
    ids = torch.randint(0, 7, (2, 5))
    model(ids).logits.sum().backward()
    teacher = make_teacher(model, torch.bfloat16)
    assert model.training and all(p.requires_grad and p.grad is not None for p in model.parameters())
    assert not teacher.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad and p.grad is None for p in teacher.parameters())
    teacher.train()  # teacher_forward must switch dropout off itself
    a, b = teacher_forward(teacher, ids), teacher_forward(teacher, ids)
    assert a.requires_grad is False and a.grad_fn is None and torch.equal(a, b)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the teacher is a copy, not a view of the student's weights
    assert torch.equal(teacher_forward(teacher, ids), a)


def test_teacher_dtype():
    assert teacher_dtype("auto", "cpu") == torch.float32
    assert teacher_dtype("bfloat16", "cpu") == torch.bfloat16
    assert teacher_dtype("float16", torch.device("cpu")) == torch.float16
