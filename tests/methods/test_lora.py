"""LoRA: only adapters train, merging is exact, adapters save and load, init is seeded, errors name the key."""

from __future__ import annotations

import pytest
import torch

from cpt.config import build
from cpt.errors import CptError, RecipeError
from cpt.methods.lora import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, LoraConfig, apply_lora, is_lora,
                              load_adapters, merge_lora, merged_copy, save_adapters)


def tiny_llama(hidden: int = 16, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained(seed: int = 0, tie: bool = False):
    """A tiny LoRA model after 5 AdamW steps (lora_B is non-zero, so the adapters change the outputs)."""
    model = apply_lora(tiny_llama(tie=tie), LoraConfig(rank=4), seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    model.train()
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_only_adapters_train_and_are_a_small_fraction():
    model = apply_lora(tiny_llama(hidden=256), LoraConfig(rank=4), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Per layer, rank 4 x (in + out) for q, k, v, o (256 -> 256) and gate, up, down (256 <-> 512).
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == 2 * 4 * (4 * (256 + 256) + 3 * (256 + 512)) == 34816
    fraction = n_trainable / sum(p.numel() for p in model.parameters())
    assert fraction == pytest.approx(34816 / 1379584)  # 2.5%; about 2 * rank / hidden for square layers
    assert fraction < 0.05
    assert is_lora(model)


def test_starts_equal_to_the_base_model():
    base = tiny_llama()
    ids = batch()
    before = logits(base, ids)
    model = apply_lora(base, LoraConfig(), seed=0)
    assert torch.equal(logits(model, ids), before)


def test_merged_model_matches_adapters_and_base_is_untouched():
    base_weights = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    model = trained()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    for name, p in model.get_base_model().named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base_weights[name.replace(".base_layer", "")]), name
    ids = batch(2)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(tiny_llama(), ids), atol=1e-3)

    copy = merged_copy(model)
    assert not is_lora(copy) and is_lora(model)
    torch.testing.assert_close(logits(copy, ids), adapted, atol=1e-5, rtol=0)
    assert torch.equal(logits(model, ids), adapted)  # the copy left the adapters in place

    plain = merge_lora(model)
    assert not is_lora(plain)
    assert all(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(logits(plain, ids), adapted, atol=1e-5, rtol=0)


def test_save_and_load_adapters_restore_the_outputs(tmp_path):
    model = trained()
    ids = batch(3)
    save_adapters(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    fresh = apply_lora(tiny_llama(), LoraConfig(rank=4), seed=123)
    assert not torch.equal(logits(fresh, ids), logits(model, ids))
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_reads_saved_adapters(tmp_path):
    from peft import PeftModel

    model = trained()
    save_adapters(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = batch(4)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_load_adapters_of_another_rank_is_an_error(tmp_path):
    save_adapters(trained(), tmp_path)
    with pytest.raises(CptError, match="do not fit"):
        load_adapters(apply_lora(tiny_llama(), LoraConfig(rank=2), seed=0), tmp_path)
    with pytest.raises(CptError, match="missing"):
        load_adapters(apply_lora(tiny_llama(), LoraConfig(rank=4), seed=0), tmp_path / "nowhere")


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_layout_loads_as_plain_merged_model(tmp_path, tie):
    """Merged weights at the top, adapters in ADAPTER_DIR: from_pretrained sees only the merged model."""
    from transformers import AutoModelForCausalLM

    model = trained(tie=tie)
    ids = batch(5)
    merged_copy(model).save_pretrained(tmp_path)
    save_adapters(model, tmp_path / ADAPTER_DIR)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert not is_lora(loaded)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_init_is_deterministic_by_seed_and_leaves_global_rng_alone():
    def adapters(seed):
        model = apply_lora(tiny_llama(), LoraConfig(), seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}

    first, again, other = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)

    model = tiny_llama()
    state = torch.get_rng_state()
    apply_lora(model, LoraConfig(), seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_target_module_names_it_and_lists_the_linear_layers():
    with pytest.raises(CptError) as e:
        apply_lora(tiny_llama(), LoraConfig(target_modules=["q_proj", "qkv_proj"]), seed=0)
    message = str(e.value)
    assert "'qkv_proj' matches no module" in message
    assert "'down_proj'" in message and "'q_proj'" in message and "'lm_head'" in message


def test_non_linear_and_tied_output_targets_are_errors():
    with pytest.raises(CptError, match="linear layers only"):
        apply_lora(tiny_llama(), LoraConfig(target_modules=["embed_tokens"]), seed=0)
    with pytest.raises(CptError, match="tied"):
        apply_lora(tiny_llama(tie=True), LoraConfig(target_modules=["lm_head"]), seed=0)


def test_applying_twice_and_merging_a_plain_model_are_errors():
    model = apply_lora(tiny_llama(), LoraConfig(), seed=0)
    with pytest.raises(CptError, match="already has LoRA"):
        apply_lora(model, LoraConfig(), seed=0)
    with pytest.raises(CptError, match="no LoRA"):
        merge_lora(tiny_llama())


@pytest.mark.parametrize("data, key", [
    ({"rank": 0}, "lora.rank"),
    ({"alpha": -1}, "lora.alpha"),
    ({"dropout": 1.0}, "lora.dropout"),
    ({"target_modules": []}, "lora.target_modules"),
    ({"target_modules": ["q_proj", "q_proj"]}, "lora.target_modules"),
    ({"rnak": 4}, "lora.rnak"),
])
def test_config_errors_name_the_key(data, key):
    with pytest.raises(RecipeError) as e:
        build(LoraConfig, data, "lora")
    assert str(e.value).startswith(key)


def test_config_defaults_target_every_llama_linear_layer():
    config = build(LoraConfig, {}, "lora")
    assert (config.rank, config.alpha, config.dropout) == (8, 16.0, 0.0)
    model = apply_lora(tiny_llama(), config, seed=0)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(config.target_modules)
