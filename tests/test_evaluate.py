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
