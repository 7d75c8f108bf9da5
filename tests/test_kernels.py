"""Attention and loss kernel choices: the recipe keys, the fallbacks on a machine without them (one log line),
and that the choices compute the same loss."""

import logging

import pytest
import torch

from cpt.config import build
from cpt.errors import RecipeError
from cpt.kernels import FusedLinearLoss, LogitsLoss, resolve_attention, resolve_loss
from cpt.model import ModelConfig, build_model, cross_entropy_for, cross_entropy_sum
from cpt.recipe import TrainConfig


class Vocab:
    def __init__(self, size):
        self.size, self.bos_token_id, self.eos_token_id = size, 1, 2

    def __len__(self):
        return self.size


def tiny(attention: str = "auto"):
    torch.manual_seed(0)
    config = build(ModelConfig, {"arch": {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2},
                                 "attn_implementation": attention})
    return build_model(config, Vocab(100), 16, None)


def test_unknown_choices_are_one_line_errors():
    with pytest.raises(RecipeError, match="model.attn_implementation: 'flash' is not allowed; expected one of "
                                          "'auto', 'sdpa', 'flash_attention_2', 'eager'"):
        build(ModelConfig, {"arch": {"layers": 1, "hidden": 8, "heads": 1}, "attn_implementation": "flash"},
              "model")
    with pytest.raises(RecipeError, match="train.loss: 'fused' is not allowed"):
        build(TrainConfig, {"loss": "fused"}, "train")
    assert build(TrainConfig, {"loss": "chunked"}).loss == "chunked"
    assert TrainConfig().loss == "auto" and ModelConfig(arch=None, init="m").attn_implementation == "auto"


def test_attention_falls_back_to_sdpa_with_one_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="cpt.kernels"):
        model = tiny("flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert [r.message for r in caplog.records if r.name == "cpt.kernels"] == [
        "model.attn_implementation flash_attention_2 cannot run here (the flash_attn package is not installed): "
        "using sdpa"]
    assert resolve_attention("auto") == "sdpa" and tiny().config._attn_implementation == "sdpa"
    assert tiny("eager").config._attn_implementation == "eager"


def test_eager_and_sdpa_give_the_same_loss_and_gradients():
    """The same weights and tokens under the two attention kernels: the summed loss agrees to 1e-5 relative and
    every gradient to 1e-4 (float32 on CPU; the kernels sum in different orders)."""
    batch = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))
    results = {}
    for attention in ("eager", "sdpa"):
        model = tiny(attention)
        loss, _ = LogitsLoss(cross_entropy_sum)(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        results[attention] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert results["eager"][0] == pytest.approx(results["sdpa"][0], rel=1e-5)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(grad, results["sdpa"][1][name], rtol=1e-4, atol=1e-6)


def test_fused_linear_falls_back_to_the_chunked_loss_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="cpt.kernels"):
        loss = cross_entropy_for(TrainConfig(loss="fused_linear"), torch.device("cpu"))
        auto = cross_entropy_for(TrainConfig(), torch.device("cpu"))
    assert isinstance(loss, LogitsLoss) and isinstance(auto, LogitsLoss)
    assert [r.message for r in caplog.records if r.name == "cpt.kernels"] == [
        "train.loss fused_linear cannot run here (no CUDA device): using the chunked loss"]  # auto falls back quietly
    assert resolve_loss("fused_linear", torch.device("cuda"), shards_weights=True) == "chunked"
    assert resolve_loss("chunked", torch.device("cuda"), shards_weights=False) == "chunked"


def reference_kernel(weight_VH, hidden_NH, labels_N):
    """What Liger's kernel computes (summed fp32 cross-entropy of ``hidden @ weight.T``, -100 ignored), unfused."""
    return torch.nn.functional.cross_entropy((hidden_NH @ weight_VH.T).float(), labels_N, ignore_index=-100,
                                             reduction="sum")


def test_fused_linear_plumbing_matches_the_chunked_loss():
    """The fused path with a stand-in kernel (Liger needs CUDA): hidden states and LM head weight reach the kernel
    so that loss and gradients equal the chunked loss of the logits, negative labels ignored alike; without
    labels the model's forward is untouched, and a step that needs the logits gets them."""
    from accelerate import Accelerator

    batch = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = batch[:, 1:].clone()
    labels[0, :3] = -1
    results = []
    for fused in (False, True):
        model = Accelerator(cpu=True).prepare(tiny())
        chunked = LogitsLoss(cross_entropy_sum)
        loss_fn = FusedLinearLoss(chunked, kernel=reference_kernel) if fused else chunked
        loss, logits = loss_fn(model, batch[:, :-1], labels)
        assert (logits is None) == fused
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6)
    assert model(input_ids=batch[:, :-1]).logits.shape == (2, 8, 100)
    _, logits = loss_fn(model, batch[:, :-1], labels, need_logits=True)
    assert logits.shape == (2, 8, 100)
