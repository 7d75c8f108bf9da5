"""Merges as arithmetic over state dicts (``name -> tensor``), tensor by tensor, computed in float32 and cast back to
the inputs' dtype:

- ``weighted_average``: ``sum_i w_i theta_i`` — linear interpolation (``[1 - alpha, alpha]``, WiSE-FT) and checkpoint
  averaging (equal weights) are its special cases;
- ``task_arithmetic``: ``target + lambda (a - b)`` — the chat vector (Huang et al. 2024) with ``a`` an instruct
  model and ``b`` its base, added to a model continually pre-trained from ``b``;
- ``ties`` and ``dare``: task vectors ``theta_i - base`` trimmed to their largest magnitudes with an elected sign
  (TIES, Yadav et al. 2023), or dropped at random and rescaled (DARE, Yu et al. 2024), then added to ``base``.

Every function checks that its inputs hold the same tensors with the same shapes and names the first that differs.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from cpt.errors import CptError

State = dict[str, torch.Tensor]


def check_compatible(states: list[State], names: list[str] | None = None, allow_rows: bool = False) -> None:
    """Raise ``CptError`` naming the first tensor missing from, or shaped differently in, one of ``states``.

    Args:
        names: how to call each input in the message (default "input 1", ...).
        allow_rows: tensors may differ in their first dimension (vocabulary rows; the caller has a policy).
    """
    names = names or [f"input {i + 1}" for i in range(len(states))]
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        missing = sorted(set(first) ^ set(state))
        if missing:
            where = names[0] if missing[0] in first else name
            other = name if where == names[0] else names[0]
            raise CptError(f"{missing[0]} is in {where} but not in {other}: the models have different architectures; "
                           "merge models of one architecture")
        for key, tensor in first.items():
            shape, theirs = tuple(tensor.shape), tuple(state[key].shape)
            same = shape[1:] == theirs[1:] and len(shape) == len(theirs) if allow_rows and shape else shape == theirs
            if not same:
                raise CptError(f"{key} is {list(shape)} in {names[0]} but {list(theirs)} in {name}: the models have "
                               "different shapes; merge models of one architecture and size")


def weighted_average(states: list[State], weights: list[float]) -> State:
    """``sum_i weights[i] * states[i]`` per tensor (non-float tensors are taken from the first state).

    Raises:
        CptError: no inputs, a weight count that differs, non-finite weights, or incompatible states.
    """
    if not states or len(states) != len(weights):
        raise CptError(f"a weighted average needs one weight per model, got {len(weights)} for {len(states)}")
    if not all(math.isfinite(w) for w in weights):
        raise CptError(f"merge weights must be finite numbers, got {weights}")
    check_compatible(states)

    def average(key: str, first: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(first)
        for state, weight in zip(states, weights):
            total.add_(state[key].to(torch.float32), alpha=weight)
        return total

    return _per_float_tensor(states[0], average)


def task_arithmetic(target: State, a: State, b: State, lam: float = 1.0,
                    vocab: Literal["error", "target"] = "error") -> State:
    """``target + lam * (a - b)`` per tensor: the chat vector added to a continually pre-trained model.

    Args:
        vocab: what to do when ``target`` has more vocabulary rows than ``a`` and ``b`` (a grown tokenizer):
            ``error`` refuses; ``target`` adds the vector to the rows ``a`` and ``b`` have and leaves the new rows
            as ``target`` has them (the new tokens have no instruct/base difference to add).
    """
    if not math.isfinite(lam):
        raise CptError(f"lambda must be a finite number, got {lam}")
    check_compatible([a, b], ["the added model", "the subtracted model"])
    # rows may differ here: the vocabulary policy below decides
    check_compatible([target, a], ["the target", "the added model"], allow_rows=True)

    def add_vector(key: str, start: torch.Tensor) -> torch.Tensor:
        rows = a[key].shape[0] if a[key].dim() else None
        if rows is not None and start.shape[0] < rows:
            raise CptError(f"{key} has {start.shape[0]} rows in the target but {rows} in the added model: the "
                           "target's vocabulary is smaller; merge into a model with at least its vocabulary")
        if rows is not None and start.shape[0] > rows and vocab != "target":
            raise CptError(f"{key} has {start.shape[0]} rows in the target but {rows} in the added and subtracted "
                           "models (a grown vocabulary); pass --vocab target to add the vector to the shared rows only")
        merged = start.clone()
        delta = a[key].to(torch.float32) - b[key].to(torch.float32)
        if rows is None:
            merged += lam * delta
        else:
            merged[:rows] += lam * delta
        return merged

    return _per_float_tensor(target, add_vector)


def ties(base: State, models: list[State], weights: list[float], density: float = 0.2) -> State:
    """TIES-merging (Yadav et al. 2023): per model, keep the ``density`` share of its task vector ``theta - base``
    with the largest magnitudes (per tensor, at least one entry); weight the kept vectors; elect each entry's sign
    by their sum (0 counts as +); average the weighted entries that agree with it over their weights (the disjoint
    mean), and add the result to ``base``. mergekit's ``ties`` (normalize on, lambda 1) computes the same
    (``tests/test_merge.py`` compares the two)."""
    _check_task_inputs(base, models, weights, density, "density")

    def elect(key: str, start: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(weights, dtype=torch.float32, device=start.device).view(-1, *([1] * start.dim()))
        deltas = torch.stack([_trim(m[key].to(torch.float32) - start, density) for m in models]) * w
        elected = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        agree = (deltas.sign() == elected).to(torch.float32)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        return start + (deltas * agree).sum(dim=0) / divisor

    return _per_float_tensor(base, elect)


def dare(base: State, models: list[State], weights: list[float], drop: float = 0.9, seed: int = 0) -> State:
    """DARE (Yu et al. 2024): drop each entry of each task vector with probability ``drop`` (seeded, the same on
    any machine: the mask is drawn on the CPU), rescale the rest by ``1 / (1 - drop)``, and add the weighted sum
    to ``base``."""
    _check_task_inputs(base, models, weights, drop, "drop", upper_open=True)
    generator = torch.Generator().manual_seed(seed)

    def drop_and_add(key: str, start: torch.Tensor) -> torch.Tensor:
        total = start.clone()
        for model, weight in zip(models, weights):
            keep = torch.rand(start.shape, generator=generator) >= drop
            delta = (model[key].to(torch.float32) - start) * keep.to(start.device) / (1 - drop)
            total += weight * delta
        return total

    return _per_float_tensor(base, drop_and_add)


def _per_float_tensor(reference: State, merge: Callable[[str, torch.Tensor], torch.Tensor]) -> State:
    """``merge(key, tensor in float32)`` for each floating-point tensor of ``reference``, in its order, cast back to
    its dtype; other tensors (integer buffers) are copied from ``reference``."""
    return {key: merge(key, tensor.to(torch.float32)).to(tensor.dtype) if tensor.is_floating_point() else tensor.clone()
            for key, tensor in reference.items()}


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``k = max(1, int(density * n))`` largest-magnitude entries set to zero."""
    k = max(1, int(density * delta.numel()))
    if density >= 1 or k >= delta.numel():
        return delta
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = True
    return torch.where(keep.view_as(delta), delta, torch.zeros_like(delta))


def _check_task_inputs(base: State, models: list[State], weights: list[float], share: float, name: str,
                       upper_open: bool = False) -> None:
    if not models or len(models) != len(weights):
        raise CptError(f"give one weight per model, got {len(weights)} for {len(models)}")
    if not all(math.isfinite(w) for w in weights):
        raise CptError(f"merge weights must be finite numbers, got {weights}")
    ok = 0 <= share < 1 if upper_open else 0 < share <= 1
    if not ok:
        raise CptError(f"{name} must be in {'[0, 1)' if upper_open else '(0, 1]'}, got {share}")
    check_compatible([base, *models], ["the base"] + [f"model {i + 1}" for i in range(len(models))])
