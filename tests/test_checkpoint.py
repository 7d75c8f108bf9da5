import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cpt.checkpoint import checkpoint_dir, rng_state, save_checkpoint


class Tokenizer:
    """Stands in for a HF tokenizer: save_pretrained writes one file."""

    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_save_is_complete_and_loadable(tmp_path, model):
    target = checkpoint_dir(tmp_path, "cpt", 7)
    state = {"counters": {"global_step": 7}, "rng": rng_state()}
    save_checkpoint(target, model, Tokenizer(), state, {"stage": "cpt"}, {"name": "x"})
    meta = json.loads((target / "meta.json").read_text())
    assert meta["stage"] == "cpt" and set(meta["files"]) >= {"model.safetensors", "train_state.pt", "config.yaml"}
    loaded = torch.load(target / "train_state.pt", weights_only=True)
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, model):
    target = checkpoint_dir(tmp_path, "cpt", 7)
    save_checkpoint(target, model, Tokenizer(), {"n": 1}, {"stage": "cpt"}, {})
    before = (target / "meta.json").read_text()

    class Broken(Tokenizer):
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, model, Broken(), {"n": 2}, {"stage": "cpt"}, {})
    assert (target / "meta.json").read_text() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-7"]  # no temporary directory left behind


def test_resave_replaces(tmp_path, model):
    target = checkpoint_dir(tmp_path, "cpt", 7)
    save_checkpoint(target, model, Tokenizer(), {"n": 1}, {"stage": "cpt", "v": 1}, {})
    save_checkpoint(target, model, Tokenizer(), {"n": 2}, {"stage": "cpt", "v": 2}, {})
    assert json.loads((target / "meta.json").read_text())["v"] == 2
    assert torch.load(target / "train_state.pt", weights_only=True)["n"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-7"]
