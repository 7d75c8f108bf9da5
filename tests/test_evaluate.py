import pytest

from cpt.config import build
from cpt.errors import RecipeError
from cpt.evaluate import EvalConfig

from conftest import read_rows, run_cpt, tiny_recipe, write_recipe


def due_steps(steps, **config):
    eval_config = build(EvalConfig, config, "eval")
    return [t for t in range(1, steps + 1) if eval_config.due(t, steps)]


def test_fixed_dense_and_geometric_schedules():
    assert due_steps(40, every=10) == [10, 20, 30, 40]
    assert due_steps(40, every=10, dense_steps=6, dense_every=2) == [2, 4, 6, 10, 20, 30, 40]
    assert due_steps(40, every=100, geometric=True) == [1, 2, 4, 8, 16, 32]


def test_eval_sets_shorthand_tags_and_budgets():
    config = build(EvalConfig, {"sets": {"upstream": "english", "code": {"corpus": "code", "tag": "downstream",
                                                                        "max_tokens": 512, "split": "all"}}}, "eval")
    assert (config.resolved["upstream"].corpus, config.resolved["upstream"].tag) == ("english", "upstream")
    assert (config.resolved["code"].tag, config.resolved["code"].max_tokens, config.resolved["code"].split) == \
        ("downstream", 512, "all")
    with pytest.raises(RecipeError, match=r"eval.sets.code.tag: 'down' is not allowed"):
        build(EvalConfig, {"sets": {"code": {"corpus": "code", "tag": "down"}}}, "eval")


def test_run_logs_tags_budgets_and_eval_cost(tiny_corpora, tmp_path):
    recipe = tiny_recipe(tiny_corpora, tmp_path / "run", pretrain=6, cpt=6)
    recipe["eval"] = {"every": 100, "dense_steps": 2, "max_tokens": 1024, "batch_size": 4,
                      "sets": {"upstream": "english", "all-code": {"corpus": "code", "split": "all", "max_tokens": 256,
                                                                  "tag": "downstream"}}}
    result = run_cpt("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "run")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {(r["set"], r["tag"], r["tokens"]) for r in evals} == {("upstream", "upstream", 1024),
                                                                 ("all-code", "downstream", 256)}
    assert sorted({r["stage_step"] for r in evals if r["stage"] == "cpt"}) == [0, 1, 2, 6]
    ends = [r for r in rows if r["kind"] == "stage" and r["event"] == "end"]
    assert all(0 < r["eval_seconds"] < r["seconds"] for r in ends)
    assert "% of it evaluating" in result.stderr


def _tiny_llama(tie: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_fp32_output_head_under_bf16_autocast(tie):
    """Under bf16 autocast the logits come out in bf16; inside fp32_output_head they are the fp32 product of the
    (autocast) hidden state and the fp32 head weight, exactly, and the head is restored afterwards."""
    import torch
    import torch.nn.functional as F

    from cpt.model import fp32_output_head

    model = _tiny_llama(tie)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        with fp32_output_head(model):
            fixed = model(input_ids=ids, use_cache=False).logits
        after = model(input_ids=ids, use_cache=False).logits
    head = model.get_output_embeddings()
    assert plain.logits.dtype == torch.bfloat16 and after.dtype == torch.bfloat16
    assert fixed.dtype == torch.float32
    hidden = plain.hidden_states[-1]
    assert torch.equal(fixed, F.linear(hidden.float(), head.weight.float()))
    # the bf16 logits are that product from bf16-rounded operands, rounded again: close, never equal
    assert not torch.equal(fixed, plain.logits.float())
    assert torch.allclose(plain.logits.float(), fixed, rtol=2 ** -7, atol=1e-2)
    assert "forward" not in vars(head)
    with torch.no_grad():  # without autocast it changes nothing: the fp32 model's own logits
        own = model(input_ids=ids, use_cache=False).logits
        with fp32_output_head(model):
            assert torch.equal(model(input_ids=ids, use_cache=False).logits, own)
