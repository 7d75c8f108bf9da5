"""HFT masks (exact per-layer counts, seeding, frozen weights untouched by AdamW) and freezing by pattern."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cpt.config import ConfigValueError, build
from cpt.errors import CptError, RecipeError
from cpt.methods.freezing import (HFTConfig, apply_trainable, freeze_patterns, hft_selection,
                                  selection_summary)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm"]
GPT2_HFT = {"attention": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"], "norms": ["ln_1", "ln_2"],
            "layers_pattern": r"h\.(\d+)\."}


def llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2))


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def trained(selection: dict[str, bool], layer: int, names: list[str]) -> list[str]:
    """The names of ``names`` whose weight trains in ``layer`` of the Llama model."""
    out = []
    for name in names:
        [key] = [k for k in selection if f"layers.{layer}." in k and k.endswith(f".{name}.weight")]
        if selection[key]:
            out.append(name)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_hft_counts_per_layer_match_the_paper(stage):
    model = llama()
    selection = hft_selection(model, HFTConfig(seed=7), stage)
    mlp_counts = []
    for layer in range(4):
        assert len(trained(selection, layer, ATTENTION)) == 2
        assert len(trained(selection, layer, NORMS)) == 1  # "half the norms": 1 of the 2 per layer
        mlp_counts.append(len(trained(selection, layer, MLP)))
    assert sorted(mlp_counts) == [1, 1, 2, 2]
    # Only the targeted modules are in the mask; embeddings, final norm and lm_head are left alone.
    assert not any(k.startswith(("model.embed_tokens", "model.norm", "lm_head")) for k in selection)
    assert len(selection) == 4 * 9
    summary = selection_summary(model, selection)
    assert summary["modules"] == {"trained": 18, "total": 36}
    assert summary["matrices"] == {"trained": 14, "total": 28}
    assert summary["categories"] == {"attention": {"trained": 8, "total": 16}, "mlp": {"trained": 6, "total": 12},
                                     "norms": {"trained": 4, "total": 8}}
    assert 0 < summary["elements"]["trained"] < summary["elements"]["total"]
    assert [e["layer"] for e in summary["layers"]] == [0, 1, 2, 3]
    assert all(len(e["trained"]) + len(e["frozen"]) == 9 for e in summary["layers"])
    assert json.loads(json.dumps(selection)) == selection
    json.dumps(summary)


def test_hft_odd_layer_count_gives_the_larger_mlp_share_to_the_smaller_half():
    model = llama(layers=3)
    selection = hft_selection(model, HFTConfig(), 0)
    assert sorted(len(trained(selection, layer, MLP)) for layer in range(3)) == [1, 1, 2]
    assert all(len(trained(selection, layer, ATTENTION)) == 2 for layer in range(3))


def test_hft_is_reproducible_and_redrawn_per_stage_and_seed():
    model = llama()
    first = hft_selection(model, HFTConfig(seed=3), 1)
    assert hft_selection(llama(), HFTConfig(seed=3), 1) == first
    torch.manual_seed(123)  # the draw does not depend on the global RNGs
    assert hft_selection(model, HFTConfig(seed=3), 1) == first
    assert hft_selection(model, HFTConfig(seed=3), 2) != first
    assert hft_selection(model, HFTConfig(seed=4), 1) != first
    with pytest.raises(ValueError):
        hft_selection(model, HFTConfig(), -1)


def test_apply_trainable_and_adamw_leave_frozen_weights_bit_identical():
    model = llama()
    selection = hft_selection(model, HFTConfig(), 0)
    apply_trainable(model, selection)
    params = dict(model.named_parameters())
    for name, train in selection.items():
        assert params[name].requires_grad is train
    assert params["model.embed_tokens.weight"].requires_grad and params["lm_head.weight"].requires_grad
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in params.items():
        if selection.get(name, True):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert p.grad is None and p not in optimizer.state
    frozen = sum(not t for t in selection.values())
    assert len(optimizer.state) == len(params) - frozen


def test_apply_trainable_rejects_a_selection_from_another_model():
    with pytest.raises(CptError, match="another model"):
        apply_trainable(llama(), {"model.layers.9.self_attn.q_proj.weight": True})
    with pytest.raises(CptError, match="another model"):
        selection_summary(llama(layers=2), hft_selection(llama(), HFTConfig(), 0))


def test_freeze_patterns_freezes_embeddings_and_bottom_layers():
    model = llama()
    frozen = freeze_patterns(model, ["embed_tokens", r"layers\.[01]\."])
    assert frozen[0] == "model.embed_tokens.weight"
    assert len(frozen) == 1 + 2 * 9
    assert all(("layers.0." in n or "layers.1." in n) for n in frozen[1:])
    for name, p in model.named_parameters():
        assert p.requires_grad is (name not in frozen)


@pytest.mark.parametrize("pattern, hint", [("embed_tokenz", "embed_tokens"), (r"layer\.[01]\.", "layers"),
                                           (r"layers\.9\.", None)])
def test_freeze_pattern_matching_nothing_names_it_and_suggests(pattern, hint):
    model = llama()
    with pytest.raises(CptError) as e:
        freeze_patterns(model, ["lm_head", pattern])
    message = str(e.value)
    assert repr(pattern) in message and "model.embed_tokens.weight" in message
    if hint:
        assert f"did you mean '{hint}'" in message
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen when a pattern is wrong


def test_freeze_pattern_that_is_not_a_regex():
    with pytest.raises(CptError, match="not a valid regular expression"):
        freeze_patterns(llama(), ["layers.("])


def test_unrecognised_architecture_says_what_it_looked_for_and_how_to_map():
    model = gpt2()
    with pytest.raises(CptError) as e:
        hft_selection(model, HFTConfig(), 0)
    message = str(e.value)
    for text in ("q_proj", "gate_proj", "input_layernorm", "transformer.h.0.", "hft: {attention:",
                 r"h\.(\d+)\."):
        assert text in message, text
    with pytest.raises(CptError) as e:
        hft_selection(model, HFTConfig(layers_pattern=r"h\.(\d+)\."), 0)
    message = str(e.value)
    assert "no module matches" in message and "q_proj" in message
    assert "attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj" in message
    # 'c_proj' alone names an attention and an MLP matrix: a dotted suffix is asked for.
    ambiguous = {**GPT2_HFT, "attention": ["c_attn", "c_proj"]}
    with pytest.raises(CptError, match="longer dotted suffix"):
        hft_selection(model, build(HFTConfig, ambiguous, "hft"), 0)


def test_gpt2_works_when_its_names_are_mapped():
    model = gpt2()
    config = build(HFTConfig, GPT2_HFT, "hft")
    selection = hft_selection(model, config, 0)
    assert len(selection) == 2 * 6 * 2  # 2 layers, 6 modules, weight and bias
    for module in ("attn.c_attn", "attn.c_proj", "ln_1", "mlp.c_fc"):
        weight, bias = f"transformer.h.0.{module}.weight", f"transformer.h.0.{module}.bias"
        assert selection[weight] == selection[bias]
    summary = selection_summary(model, selection, config)
    assert summary["categories"] == {c: {"trained": 2, "total": 4} for c in ("attention", "mlp", "norms")}
    assert summary["modules"] == {"trained": 6, "total": 12}
    apply_trainable(model, selection)
    assert sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 12


@pytest.mark.parametrize("data, key", [
    ({"seed": -1}, "hft.seed"),
    ({"attention": ["q_proj", "q_proj"]}, "hft.attention"),
    ({"mlp": ["gate_proj", "up_proj", "q_proj"]}, "hft.mlp"),
    ({"norms": [".ln_1"]}, "hft.norms"),
    ({"attention": [], "mlp": [], "norms": []}, "hft.attention"),
    ({"layers_pattern": r"layers\.(\d+"}, "hft.layers_pattern"),
    ({"layers_pattern": r"layers\.\d+\."}, "hft.layers_pattern"),
    ({"attentions": ["q_proj"]}, "hft.attentions"),
])
def test_config_validation_names_the_key(data, key):
    with pytest.raises(RecipeError) as e:
        build(HFTConfig, data, "hft")
    assert str(e.value).startswith(key + ":")


def test_config_error_carries_the_key_when_built_directly():
    with pytest.raises(ConfigValueError) as e:
        HFTConfig(layers_pattern="layers")
    assert e.value.key == "layers_pattern"
