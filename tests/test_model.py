import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt.config import build
from cpt.errors import CptError, RecipeError
from cpt.model import ModelConfig, build_model, count_parameters, token_loss_sum


class Vocab:
    """The part of a tokenizer build_model reads."""

    def __init__(self, size):
        self.size, self.bos_token_id, self.eos_token_id = size, 1, 2

    def __len__(self):
        return self.size


def scratch(**arch):
    return build(ModelConfig, {"init": "scratch", "arch": {"layers": 2, "hidden": 32, "heads": 4, **arch}})


def test_scratch_llama_shapes():
    model = build_model(scratch(kv_heads=2), Vocab(100), 64, None)
    config = model.config
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (100, 2, 32)
    assert config.num_key_value_heads == 2 and config.max_position_embeddings == 64
    assert config.intermediate_size == 128  # 8/3 * 32 = 85 -> rounded up to a multiple of 64
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied by default
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, key", [({"heads": 5}, "heads"), ({"kv_heads": 3}, "kv_heads"), ({"layers": 0}, "layers")])
def test_invalid_arch(arch, key):
    with pytest.raises(RecipeError, match=f"model.arch.{key}"):
        build(ModelConfig, {"arch": {"layers": 2, "hidden": 32, "heads": 4, **arch}}, "model")


def saved_model(tmp_path, vocab):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "m")
    return model


def test_init_from_local_directory(tmp_path):
    original = saved_model(tmp_path, 100)
    model = build_model(build(ModelConfig, {"init": "m"}), Vocab(100), 64, tmp_path)
    for key, value in original.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_vocabulary_mismatch_is_an_error_unless_resizing(tmp_path):
    saved_model(tmp_path, 100)
    with pytest.raises(CptError, match="tokenizer has 300 tokens but the model's embeddings have 100 rows"):
        build_model(build(ModelConfig, {"init": "m"}), Vocab(300), 64, tmp_path)
    resized = build_model(build(ModelConfig, {"init": "m", "resize_embeddings": True}), Vocab(300), 64, tmp_path)
    assert resized.get_input_embeddings().weight.shape[0] == 300
    # A model padded past the tokenizer's size (a common layout) is accepted as is.
    assert build_model(build(ModelConfig, {"init": "m"}), Vocab(90), 64, tmp_path).config.vocab_size == 100


def test_missing_model_directory(tmp_path):
    with pytest.raises(CptError, match="not a local Hugging Face model directory"):
        build_model(build(ModelConfig, {"init": "nowhere"}), Vocab(10), 64, tmp_path)


def test_token_loss_sum_is_summed_cross_entropy():
    torch.manual_seed(0)
    model = build_model(scratch(), Vocab(50), 16, None)
    ids = torch.randint(0, 50, (3, 9))
    logits = model(input_ids=ids[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert token_loss_sum(model, ids[:, :-1], ids[:, 1:]).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_the_whole_fp32_loss(dtype):
    """Several chunks (4,096 columns: 128 rows a chunk on CPU) and a short last one; ignored labels as in
    ``F.cross_entropy``; value and gradient against the fp32 formula, the gradient in the logits' dtype."""
    from cpt.model import ChunkedCrossEntropy, _loss_chunk_rows

    torch.manual_seed(0)
    logits = (torch.randn(300, 4096) * 4).to(dtype)
    labels = torch.randint(0, 4096, (300,))
    labels[[5, 140, 299]] = -100
    assert _loss_chunk_rows(logits) == 128
    whole = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(whole.float(), labels, reduction="sum")
    (expected * 0.5).backward()
    chunked = logits.clone().requires_grad_()
    loss = ChunkedCrossEntropy.apply(chunked, labels)
    (loss * 0.5).backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert chunked.grad.dtype == dtype
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    kept = labels >= 0
    softmax = torch.softmax(logits.float(), dim=-1)
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), 4096).float()
    formula = 0.5 * (softmax - onehot) * kept[:, None]
    torch.testing.assert_close(chunked.grad.float(), formula, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)
    assert chunked.grad[[5, 140, 299]].abs().max().item() == 0.0


def test_kv_heads_zero_is_rejected():
    with pytest.raises(RecipeError, match="model.arch.kv_heads: must be a positive divisor of heads=4, got 0"):
        build(ModelConfig, {"arch": {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 0}}, "model")


@pytest.mark.parametrize("option", ["activation_checkpointing", "compile"])
def test_speed_options_train_like_the_plain_model(option):
    """Activation checkpointing recomputes the same activations and torch.compile fuses the same arithmetic: over
    4 AdamW steps with 2 accumulated micro-batches the losses and gradient norms are the plain model's (to
    float rounding), and the module is changed in place (the same object goes on to Accelerate)."""
    from accelerate import Accelerator

    from cpt.model import apply_speed_options, cross_entropy_for
    from cpt.recipe import TrainConfig
    from cpt.optim import build_optimizer
    from cpt.trainer import train_step

    accelerator = Accelerator(cpu=True)
    # the same step's batch 4 times, so that 4 steps visibly lower its loss
    batches = torch.randint(0, 100, (1, 2, 3, 17), generator=torch.Generator().manual_seed(0)).expand(4, -1, -1, -1)
    curves = {}
    for speed in (False, True):
        torch.manual_seed(0)
        model = build_model(scratch(), Vocab(100), 16, None)
        train = TrainConfig(seq_len=16, micro_batch=3, grad_accum=2, **{option: speed})
        same = model
        apply_speed_options(model, train)
        assert model is same
        optimizer = build_optimizer(model, train, 1e-2)
        loss = cross_entropy_for(train)  # as the Trainer picks
        curves[speed] = [train_step(model, optimizer, list(step), accelerator, 1.0, cross_entropy=loss)
                         for step in batches]
    if option == "compile":
        assert model._compiled_call_impl is not None
    else:
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in curves[True]] == pytest.approx([m[key] for m in curves[False]], rel=1e-5)
    assert curves[False][-1]["loss"] < curves[False][0]["loss"] - 0.1  # it trained


def test_seq_len_beyond_learned_positions_is_one_line_and_beyond_rotary_a_warning(tmp_path, caplog):
    """GPT-2's learned positions end at n_positions: 64 tokens through a 32-position model is an IndexError deep in
    the forward; cpt says so before training. A rotary model runs past its context, with a warning."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(IndexError):
        gpt2(torch.zeros(1, 64, dtype=torch.long))
    gpt2.save_pretrained(tmp_path / "gpt2")
    config = build(ModelConfig, {"init": "gpt2"})
    with pytest.raises(CptError) as e:
        build_model(config, Vocab(100), 64, tmp_path)
    assert str(e.value) == (f"train.seq_len 64 is longer than the 32 positions of {tmp_path / 'gpt2'}'s position "
                            "embeddings; set train.seq_len to 32 or less")
    assert build_model(config, Vocab(100), 32, tmp_path).config.n_positions == 32

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(tmp_path / "rope")
    with caplog.at_level("WARNING", logger="cpt.model"):
        build_model(build(ModelConfig, {"init": "rope"}), Vocab(100), 64, tmp_path)
    assert "train.seq_len 64 is longer than the 32 positions" in caplog.text and "rope_scaling" in caplog.text
