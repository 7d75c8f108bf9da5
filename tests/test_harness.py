"""``cpt eval --lm-eval``: lm-evaluation-harness on a tiny trained checkpoint and on its export, offline.

The harness's numbers are checked against the same quantities computed here directly from the model:
bits per byte of rolling log-likelihood over the held-out documents, and multiple-choice accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cpt as cpt, tiny_recipe, write_recipe

pytest.importorskip("lm_eval")  # a dev dependency; the import is what `cpt eval` itself needs


@pytest.fixture(scope="module")
def trained(tiny_corpora, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness")
    path = write_recipe(root / "tiny.yaml", tiny_recipe(tiny_corpora, root / "run", pretrain=6, cpt=6))
    result = cpt("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "cpt" / "step-12"


def load(checkpoint: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


@torch.no_grad()
def rolling_logprob(model, ids: list[int], prefix: int, window: int) -> float:
    """Sum of log p(token | preceding tokens) over a document, the first token conditioned on ``prefix``,
    scored in disjoint prediction windows that each see up to ``window`` tokens of context."""
    s = [prefix, *ids]
    total, done = 0.0, 0
    while done < len(ids):
        end = done + min(window, len(ids) - done)
        start = max(0, end - window)
        logits = model(torch.tensor([s[start:end]])).logits[0].double().log_softmax(-1)
        targets = torch.tensor(s[start + 1:end + 1])
        picked = logits[torch.arange(len(targets)), targets]
        total += picked[-(end - done):].sum().item()
        done = end
    return total


def test_heldout_task_matches_the_models_own_bits_per_byte(trained):
    result = cpt("eval", str(final_checkpoint(trained)), "--lm-eval", "cpt_upstream,cpt_downstream", "--limit", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    out = trained / "lm_eval" / "cpt-step-12.json"
    assert str(out) in result.stdout and "cpt_upstream: " in result.stdout
    record = json.loads(out.read_text())
    model, tokenizer = load(final_checkpoint(trained))
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for task in ("cpt_upstream", "cpt_downstream"):
        docs = [json.loads(line)["text"] for line in
                (trained / "lm_eval" / "tasks" / f"{task}.jsonl").read_text().splitlines()][:4]
        assert docs and all(docs)
        logprob = sum(rolling_logprob(model, tokenizer(d, add_special_tokens=False).input_ids, prefix,
                                      model.config.max_position_embeddings) for d in docs)
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        expected = -logprob / n_bytes / math.log(2)
        assert record["results"][task]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-4)


def test_heldout_documents_are_the_runs_held_out_split(trained):
    from cpt.data.shards import TokenShard
    from cpt.harness import write_heldout_tasks

    tasks = write_heldout_tasks(trained)
    assert sorted(p.name for p in tasks.iterdir()) == ["cpt_downstream.jsonl", "cpt_downstream.yaml",
                                                       "cpt_upstream.jsonl", "cpt_upstream.yaml"]
    shard = TokenShard.open(next((trained / "data").glob("english-*")))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final_checkpoint(trained))
    docs = [json.loads(line)["text"] for line in (tasks / "cpt_upstream.jsonl").read_text().splitlines()]
    ids = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False).input_ids, tokenizer.eos_token_id]]
    # The documents re-tokenize to the start of the held-out token split, and reach its 1024-token budget.
    assert ids == shard.val.tokens[:len(ids)].tolist()
    assert len(ids) >= 1024 or len(ids) == len(shard.val.tokens)


MC_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@torch.no_grad()
def choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens the way the harness does (the pair encoded
    whole, the context's tokens removed from the front)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    inp = torch.tensor([(ctx + cont)[:-1]])
    logits = model(inp).logits[0].double().log_softmax(-1)[-len(cont):]
    return logits[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


def test_exported_model_runs_a_local_multiple_choice_task(trained, tiny_corpora, tmp_path):
    export = tmp_path / "export"
    assert cpt("export", str(final_checkpoint(trained)), str(export)).returncode == 0
    english = [json.loads(line)["text"] for line in (tiny_corpora / "english.jsonl").read_text().splitlines()]
    verses = [line for doc in english for line in doc.split("\n") if len(line.split()) > 6][:8]
    assert len(verses) == 8
    docs = []
    for i, verse in enumerate(verses):
        words = verse.split()
        right, wrong = words[-1], ["fish", "iron", "cloud", "stone"][i % 4]
        docs.append({"query": " ".join(words[:-1]), "choices": [right, wrong] if i % 2 == 0 else [wrong, right],
                     "label": i % 2})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.jsonl"))
    out = tmp_path / "mc.json"
    result = cpt("eval", str(export), "--lm-eval", "tiny_mc", "--include", str(tasks), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    model, tokenizer = load(export)
    # The harness puts its target delimiter, one space, between the query and each choice.
    correct = [max(range(2), key=lambda j: choice_logprob(model, tokenizer, d["query"], " " + d["choices"][j]))
               == d["label"] for d in docs]
    assert json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(docs))


def test_a_task_that_needs_the_hub_is_refused_with_the_fix(trained, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text(yaml.safe_dump({"task": "hub_task", "dataset_path": "someorg/somedata",
                                                    "output_type": "loglikelihood", "test_split": "test",
                                                    "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"}))
    result = cpt("eval", str(final_checkpoint(trained)), "--lm-eval", "hub_task", "--include", str(tasks))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "someorg/somedata" in line and "offline" in line and "dataset_path: json" in line


def test_bad_checkpoints_and_task_names_get_one_line_errors(trained, tmp_path):
    result = cpt("eval", str(tmp_path), "--lm-eval", "cpt_upstream")
    assert result.returncode == 2 and "not a model directory" in result.stderr and "Traceback" not in result.stderr

    result = cpt("eval", str(final_checkpoint(trained)), "--lm-eval", "cpt_upstraem")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown lm-eval task 'cpt_upstraem'" in result.stderr and "did you mean 'cpt_upstream'" in result.stderr

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(final_checkpoint(trained), broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    result = cpt("eval", str(broken), "--lm-eval", "cpt_upstream")
    assert result.returncode == 2 and "not intact" in result.stderr and "Traceback" not in result.stderr
