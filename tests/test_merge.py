"""``cpt merge``: merged tensors against hand-computed ones (interpolation, averaging, chat vector with a grown
vocabulary, TIES, DARE), the output directory (loadable, tokenizer, lineage, sha256), one-line refusals that leave
everything as it was, and the interpolation sweep evaluated on a run's own eval sets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_rows as rows_of, run_cpt as cpt, tiny_recipe, write_recipe
from cpt.checkpoint import sha256_file
from cpt.errors import CptError
from cpt.merging.arithmetic import dare, task_arithmetic, ties


@pytest.fixture(scope="module")
def run(tiny_corpora, tmp_path_factory):
    """A tiny run: pretrain (8 steps) then cpt (12), checkpoints every 4 steps, all kept."""
    root = tmp_path_factory.mktemp("merge")
    recipe = tiny_recipe(tiny_corpora, root / "run", pretrain=8, cpt=12)
    recipe["checkpoint"] = {"every": 4, "keep_last": 10}
    result = cpt("run", str(write_recipe(root / "r.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def ckpt(run, stage, step):
    return run / "checkpoints" / stage / f"step-{step}"


def weights(path):
    return load_file(path / "model.safetensors")


def llama(tmp_path, name, seed, vocab=32, hidden=16, layers=2, tied=False, **save):
    """A tiny Llama (untied unless ``tied``) saved as a plain HF directory (``save``: save_pretrained's options)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    path = tmp_path / name
    LlamaForCausalLM(config).save_pretrained(path, **save)
    return path


def merge_in_process(capsys, *args):
    """``cpt merge ARGS`` in this process (no interpreter start-up): the exit code and what went to stderr."""
    from cpt.cli import main

    capsys.readouterr()
    rc = main(["merge", *map(str, args)])
    return rc, capsys.readouterr().err


def test_linear_merge_by_hand_and_the_output_directory(run, tmp_path):
    from transformers import AutoModelForCausalLM

    base, model, out = ckpt(run, "pretrain", 8), ckpt(run, "cpt", 20), tmp_path / "merged"
    result = cpt("merge", "linear", "--base", str(base), "--model", str(model), "--alpha", "0.3", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b, merged = weights(base), weights(model), weights(out)
    assert set(merged) == set(b)
    for k in b:
        torch.testing.assert_close(merged[k], 0.7 * a[k] + 0.3 * b[k], rtol=0, atol=1e-6)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 512
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    assert not (out / "train_state.pt").exists() and not (out / "meta.json").exists()
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear" and record["params"] == {"alpha": 0.3}
    assert [(i["role"], i["sha256"]) for i in record["inputs"]] == [
        ("base", sha256_file(base / "model.safetensors")), ("model", sha256_file(model / "model.safetensors"))]
    assert record["cpt_version"] and all(sha256_file(out / name) == f["sha256"] for name, f in record["files"].items())


def test_average_of_a_stage_s_last_checkpoints(run, tmp_path):
    out = tmp_path / "avg"
    result = cpt("merge", "average", "--run", str(run), "--stage", "cpt", "--last", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    parts = [weights(ckpt(run, "cpt", s)) for s in (12, 16, 20)]
    merged = weights(out)
    for k in merged:
        torch.testing.assert_close(merged[k], (parts[0][k] + parts[1][k] + parts[2][k]) / 3, rtol=0, atol=1e-6)
    record = json.loads((out / "merge.json").read_text())
    assert len(record["inputs"]) == 3 and record["params"] == {"weights": [1 / 3] * 3}


def test_chat_vector_by_hand_and_a_grown_vocabulary(tmp_path):
    base, instruct = llama(tmp_path, "base", 0), llama(tmp_path, "instruct", 1)
    target = llama(tmp_path, "target", 2)
    out = tmp_path / "chat"
    result = cpt("merge", "chat-vector", "--target", str(target), "--add", str(instruct), "--subtract", str(base),
                 "--lambda", "0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    t, a, b, merged = weights(target), weights(instruct), weights(base), weights(out)
    for k in t:
        torch.testing.assert_close(merged[k], t[k] + 0.5 * (a[k] - b[k]), rtol=0, atol=1e-6)

    grown = llama(tmp_path, "grown", 3, vocab=40)
    refused = cpt("merge", "chat-vector", "--target", str(grown), "--add", str(instruct), "--subtract", str(base),
                  "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "grown vocabulary" in refused.stderr and "--vocab target" in refused.stderr
    assert refused.stderr.count("\n") == 1 and not (tmp_path / "no").exists()
    out = tmp_path / "grown-chat"
    result = cpt("merge", "chat-vector", "--target", str(grown), "--add", str(instruct), "--subtract", str(base),
                 "--vocab", "target", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    g, merged = weights(grown), weights(out)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[k][:32], g[k][:32] + a[k] - b[k], rtol=0, atol=1e-6)
        assert torch.equal(merged[k][32:], g[k][32:])  # the new tokens' rows are the target's


def test_ties_and_dare_by_hand():
    base = {"w": torch.zeros(4)}
    first = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}
    second = {"w": torch.tensor([-2.0, -4.0, 0.1, 1.0])}
    # density 0.5 keeps the 2 largest |delta| of each: [3, 0, 0, 2] and [-2, -4, 0, 0]; elected signs of the
    # sums [1, -4, 0, 2]: +, -, 0, +; disjoint means: entry 0 keeps 3 (the -2 disagrees), entry 1 -4, entry 3 2
    merged = ties(base, [first, second], [1.0, 1.0], density=0.5)
    assert torch.equal(merged["w"], torch.tensor([3.0, -4.0, 0.0, 2.0]))
    # no drop: the weighted sum of the task vectors
    torch.testing.assert_close(dare(base, [first, second], [0.5, 0.5], drop=0.0)["w"], (first["w"] + second["w"]) / 2)
    dropped = dare(base, [first], [1.0], drop=0.5, seed=0)["w"]
    assert all(v == 0 or v == 2 * d for v, d in zip(dropped.tolist(), first["w"].tolist()))
    assert torch.equal(dropped, dare(base, [first], [1.0], drop=0.5, seed=0)["w"])  # seeded
    with pytest.raises(CptError, match="density must be in"):
        ties(base, [first], [1.0], density=0.0)
    with pytest.raises(CptError, match="lambda must be a finite number"):
        task_arithmetic(base, first, second, float("nan"))


def test_ties_and_dare_from_the_command_line(tmp_path):
    base, a, b = llama(tmp_path, "base", 0), llama(tmp_path, "a", 1), llama(tmp_path, "b", 2)
    for method, extra in (("ties", ["--density", "0.3"]), ("dare", ["--drop", "0.5", "--seed", "1"])):
        out = tmp_path / method
        result = cpt("merge", method, str(a), str(b), "--base", str(base), "--weights", "0.5,0.5", *extra,
                     "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((out / "merge.json").read_text())
        assert record["method"] == method and record["params"]["weights"] == [0.5, 0.5]
        assert not torch.equal(weights(out)["lm_head.weight"], weights(base)["lm_head.weight"])


def test_bad_input_is_one_line_and_overwrites_nothing(run, tmp_path, capsys):
    small, wide, deep = llama(tmp_path, "small", 0), llama(tmp_path, "wide", 1, hidden=32), \
        llama(tmp_path, "deep", 2, layers=3)
    grown = llama(tmp_path, "grown", 3, vocab=40)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt(run, "cpt", 20), broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    # plain HF directories have no recorded hashes: a cut-short weights file and an unreadable config
    cut, bad_config = tmp_path / "cut", tmp_path / "bad-config"
    shutil.copytree(small, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate((cut / "model.safetensors").stat().st_size - 100)
    shutil.copytree(small, bad_config)
    (bad_config / "config.json").write_text("{not json")
    (tmp_path / "a-file").write_text("x")
    good = str(ckpt(run, "cpt", 20))
    cases = [
        (["linear", "--base", small, "--model", wide, "--alpha", "0.5", "--out", tmp_path / "o1"],
         "different shapes"),
        (["linear", "--base", small, "--model", deep, "--alpha", "0.5", "--out", tmp_path / "o2"],
         "differ in num_hidden_layers"),
        (["linear", "--base", good, "--model", good, "--alpha", "1.5", "--out", tmp_path / "o3"],
         "--alpha must be in [0, 1]"),
        (["linear", "--base", good, "--model", good, "--sweep", "alpha=0,2", "--out", tmp_path / "o4"],
         "every alpha must be in [0, 1]"),
        (["linear", "--base", good, "--model", good, "--alpha", "0.5", "--out", existing], "exists"),
        (["average", good, "--out", tmp_path / "o5"], "at least 2 models"),
        (["average", good, tmp_path / "missing", "--out", tmp_path / "o6"], "does not exist"),
        (["average", good, broken, "--out", tmp_path / "o7"], "broken checkpoint"),
        (["chat-vector", "--target", good, "--add", good, "--subtract", good, "--lambda", "nan", "--out",
          tmp_path / "o8"], "lambda must be a finite number"),
        (["average", small, cut, "--out", tmp_path / "o9"], "cut/model.safetensors is not a readable safetensors"),
        (["average", small, bad_config, "--out", tmp_path / "o10"], "bad-config/config.json is not valid JSON"),
        (["average", small, small, "--out", tmp_path / "a-file" / "o11"], "a-file is a file"),
        (["linear", "--base", small, "--model", grown, "--alpha", "0.5", "--out", tmp_path / "o12"],
         "different vocabularies (vocab_size 32 vs 40)"),
        (["ties", grown, "--base", small, "--out", tmp_path / "o13"], "different vocabularies"),
    ]
    for args, message in cases:
        rc, err = merge_in_process(capsys, *args)
        assert rc == 2, (args, err[-2000:])
        assert message in err and err.count("\n") == 1, (args, err)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 14))
    assert not list(tmp_path.glob(".o*"))  # no temporary directory left behind


def test_sharded_and_tied_inputs(tmp_path, capsys):
    """Sharded weights merge like single files and each input's sha256 covers its shards (the index alone is the
    same for any two models of one architecture); a tied model saved with and without ``lm_head.weight`` merges
    as the one embedding it is; the output directory gets the umask's mode, not mkdtemp's 0700."""
    from transformers import AutoModelForCausalLM

    a, b = llama(tmp_path, "a", 0, max_shard_size="10KB"), llama(tmp_path, "b", 1, max_shard_size="10KB")
    assert len(list(a.glob("model-*.safetensors"))) > 1
    out = tmp_path / "sharded"
    rc, err = merge_in_process(capsys, "linear", "--base", a, "--model", b, "--alpha", "0.25", "--out", out)
    assert rc == 0, err
    parts = [{k: v for f in sorted(p.glob("model-*.safetensors")) for k, v in load_file(f).items()} for p in (a, b)]
    merged = weights(out)
    assert set(merged) == set(parts[0])
    for k in merged:
        torch.testing.assert_close(merged[k], 0.75 * parts[0][k] + 0.25 * parts[1][k], rtol=0, atol=1e-6)
    inputs = json.loads((out / "merge.json").read_text())["inputs"]
    for entry, path in zip(inputs, (a, b)):
        shards = {f.name: sha256_file(f) for f in sorted(path.glob("model-*.safetensors"))}
        assert entry["shards"] == shards
        lines = "".join(f"{name} {digest}\n" for name, digest in sorted(shards.items()))
        assert entry["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert inputs[0]["sha256"] != inputs[1]["sha256"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask

    plain, with_head = llama(tmp_path, "tied", 2, tied=True), llama(tmp_path, "tied-head", 3, tied=True)
    extra = weights(with_head)
    assert "lm_head.weight" not in extra  # transformers leaves it out; other writers keep it:
    save_file({**extra, "lm_head.weight": extra["model.embed_tokens.weight"].clone()},
              str(with_head / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "tied-out"
    rc, err = merge_in_process(capsys, "average", plain, with_head, "--out", out)
    assert rc == 0, err
    merged, first = weights(out), weights(plain)
    assert "lm_head.weight" not in merged
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               (first["model.embed_tokens.weight"] + extra["model.embed_tokens.weight"]) / 2,
                               rtol=0, atol=1e-6)
    net = AutoModelForCausalLM.from_pretrained(out)
    assert net.lm_head.weight is net.model.embed_tokens.weight


def test_a_tied_head_is_filled_in_for_evaluation():
    """The sweep loads each merge into the run's model: a tied model's one embedding fills both names, whether or
    not its config said it is tied; an untied model's state is left as it is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.merging.sweep import _with_tied_head

    def net(tied):
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))

    tied = net(True)
    state = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    filled = _with_tied_head(tied, state)
    assert filled["lm_head.weight"] is state["model.embed_tokens.weight"]
    tied.load_state_dict(filled)
    untied = net(False)
    state = untied.state_dict()
    assert _with_tied_head(untied, state) is state


def test_sweep_evaluates_on_the_run_s_own_windows_and_reports(run, tmp_path):
    base, model = ckpt(run, "pretrain", 8), ckpt(run, "cpt", 20)
    result = cpt("merge", "linear", "--base", str(base), "--model", str(model), "--sweep", "alpha=0,0.5,1",
                 "--eval", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "report" / "merge-sweep.json").read_text())
    assert [r["alpha"] for r in record["rows"]] == [0, 0.5, 1] and record["sets"] == ["upstream", "downstream"]
    evals = [r for r in rows_of(run) if r["kind"] == "eval"]
    # the same weights on the same windows with the same precision as the run's own evaluation; the tolerance
    # only allows for a different summation order between processes (the numbers agree to ~1e-12 here)
    for alpha, stage in ((0, "pretrain"), (1, "cpt")):
        row = next(r for r in record["rows"] if r["alpha"] == alpha)
        for name in ("upstream", "downstream"):
            logged = [r["loss"] for r in evals if r["stage"] == stage and r["set"] == name][-1]
            assert row[name] == pytest.approx(logged, abs=1e-6), (alpha, name)
    assert (run / "report" / "merge-sweep.png").stat().st_size > 1000
    assert "| 0.5 |" in (run / "report" / "merge-sweep.md").read_text() and "| 0.5 |" in result.stdout
    report = cpt("report", str(run))
    assert report.returncode == 0, report.stderr[-2000:]
    html = (run / "report" / "index.html").read_text()
    assert "Merging: interpolation toward the base" in html and "merge-sweep.png" in html


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_agrees_with_mergekit(method, tmp_path):
    """cpt's arithmetic against mergekit's (the reference implementation the issue names) on the same tiny models:
    linear at alpha 0.3 (mergekit: weights 0.7 / 0.3) and TIES at density 0.3 with weights 0.6 / 0.4. Both compute in
    float32 in a different order, hence the tolerance."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, a, b = llama(tmp_path, "base", 0), llama(tmp_path, "a", 1), llama(tmp_path, "b", 2)
    if method == "linear":
        config = {"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": str(base), "parameters": {"weight": 0.7}},
                             {"model": str(a), "parameters": {"weight": 0.3}}]}
        args = ["linear", "--base", str(base), "--model", str(a), "--alpha", "0.3"]
    else:
        config = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(a), "parameters": {"weight": 0.6, "density": 0.3}},
                             {"model": str(b), "parameters": {"weight": 0.4, "density": 0.3}}]}
        args = ["ties", str(a), str(b), "--base", str(base), "--weights", "0.6,0.4", "--density", "0.3"]
    theirs_dir, ours_dir = tmp_path / "mergekit", tmp_path / "cpt"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))), str(theirs_dir),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    result = cpt("merge", *args, "--out", str(ours_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = {}
    for path in theirs_dir.glob("*.safetensors"):
        theirs.update(load_file(path))
    ours = weights(ours_dir)
    assert set(theirs) == set(ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)
