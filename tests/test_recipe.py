"""Tests for cpt.recipe: the real schema, its cross-field checks, loading with overrides, and `cpt check`."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe, write_recipe
from cpt.config import build
from cpt.errors import CptError, RecipeError
from cpt.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
# Shipped sweep files (`cpt sweep`) are named sweep-*.yaml; every other YAML in recipes/ is a recipe.
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("sweep-"))
SWEEPS = sorted((ROOT / "recipes").glob("sweep-*.yaml"))


@pytest.fixture
def raw(tmp_path) -> dict:
    # Validation never reads the corpora, so they need not exist.
    return tiny_recipe(tmp_path / "corpora", tmp_path / "run")


def error(raw: dict) -> str:
    with pytest.raises(RecipeError) as e:
        build(Recipe, raw)
    return str(e.value)


def test_tiny_recipe_validates(raw, tmp_path):
    recipe = build(Recipe, raw)
    assert recipe.name == "tiny"
    assert [s.name for s in recipe.stages] == ["pretrain", "cpt"]
    assert recipe.stages[1].mixture == {"code": 0.9, "english": 0.1}
    assert recipe.model.arch.layers == 2 and recipe.model.arch.hidden == 32
    assert recipe.tokenizer.train.vocab_size == 512
    assert recipe.eval.sets == {"upstream": "english", "downstream": "code"}
    assert recipe.stages[0].schedule.min_lr == pytest.approx(1e-3)  # default 0.1 * peak_lr
    assert recipe.run_dir == tmp_path / "run"


def test_load_recipe_with_overrides(raw, tmp_path):
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    recipe, base = load_recipe(path, ["train.max_steps=3", "stages.cpt.steps=7", "stages.0.schedule.peak_lr=1e-3"])
    assert base == tmp_path.resolve()
    assert recipe.train.max_steps == 3
    assert recipe.stages[1].steps == 7
    assert recipe.stages[0].schedule.peak_lr == 1e-3
    assert recipe.train.stage_steps(recipe.stages[0]) == 3
    assert recipe.stages[1].schedule.peak_lr == 1e-2  # the other stage is untouched


def test_override_error_comes_from_load_recipe(raw, tmp_path):
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    with pytest.raises(RecipeError, match=r"^override stages\.cpu: no entry named 'cpu' \(did you mean 'cpt'\?\)"):
        load_recipe(path, ["stages.cpu.steps=7"])


def test_mixed_precision_no_in_yaml(raw, tmp_path):
    # YAML 1.1 reads the bare word `no` as false; the recipe means the Literal value "no".
    raw["train"]["mixed_precision"] = "no"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw).replace("mixed_precision: 'no'", "mixed_precision: no"))
    assert "mixed_precision: no\n" in path.read_text()
    recipe, _ = load_recipe(path, [])
    assert recipe.train.mixed_precision == "no"
    recipe, _ = load_recipe(path, ["train.mixed_precision=off"])
    assert recipe.train.mixed_precision == "no"


# --- invalid content: each names the key path and what is allowed ------------------------------------------

def test_unknown_top_level_key_suggests(raw):
    raw["stage"] = raw.pop("stages")
    msg = error(raw)
    assert msg.startswith("stage: unknown key (did you mean 'stages'?); allowed: name, model, corpora, stages,")
    assert "wandb" in msg


def test_unknown_nested_key(raw):
    raw["train"]["max_step"] = 3
    msg = error(raw)
    assert msg.startswith("train.max_step: unknown key (did you mean 'max_steps'?); allowed: seq_len, micro_batch")


def test_unknown_key_in_stage_schedule(raw):
    raw["stages"][1]["schedule"]["peak"] = 1.0
    assert error(raw).startswith("stages[1].schedule.peak: unknown key (did you mean 'peak_lr'?)")


def test_wrong_type(raw):
    raw["train"]["seq_len"] = "long"
    assert error(raw) == "train.seq_len: expected an integer, got 'long'"


def test_float_string_in_schedule_accepted(raw):
    raw["stages"][0]["schedule"]["peak_lr"] = "3e-4"  # what YAML 1.1 makes of `peak_lr: 3e-4`
    assert build(Recipe, raw).stages[0].schedule.peak_lr == 3e-4


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "micro_batch", 0, "train.micro_batch: must be a positive integer"),
    ("train", "max_steps", -1, "train.max_steps: must be a positive integer"),
    ("train", "beta1", 1.0, "train.beta1: must be in [0, 1), got 1.0"),
    ("train", "beta2", 1.5, "train.beta2: must be in [0, 1), got 1.5"),
    ("eval", "every", 0, "eval.every: must be a positive number of steps"),
    ("checkpoint", "every", 0, "checkpoint.every: must be a positive number of steps"),
])
def test_out_of_range_section_values(raw, section, key, value, expected):
    raw.setdefault(section, {})[key] = value
    assert error(raw) == expected


def test_min_lr_above_peak(raw):
    raw["stages"][1]["schedule"]["min_lr"] = 0.1
    assert error(raw) == "stages[1].schedule.min_lr: must be in [0, peak_lr=0.01], got 0.1"


def test_negative_mixture_weight(raw):
    raw["stages"][1]["mixture"]["english"] = -0.1
    assert error(raw) == "stages[1].mixture.english: weight must be a number >= 0, got -0.1"


def test_all_zero_mixture(raw):
    raw["stages"][0]["mixture"] = {"english": 0}
    assert error(raw) == "stages[0].mixture: weights are all zero; give at least one positive weight"


def test_empty_mixture(raw):
    raw["stages"][0]["mixture"] = {}
    assert error(raw) == "stages[0].mixture: must name at least one corpus"


def test_stage_steps_must_be_positive(raw):
    raw["stages"][1]["steps"] = 0
    assert error(raw) == "stages[1].steps: must be a positive integer, got 0"


def test_bad_stage_name(raw):
    raw["stages"][0]["name"] = "pre train"
    assert error(raw) == "stages[0].name: 'pre train' must be letters, digits, '-' or '_'"


def test_val_fraction_out_of_range(raw):
    raw["corpora"]["code"]["val_fraction"] = 1.5
    assert error(raw) == "corpora.code.val_fraction: must be in (0, 1), got 1.5"


def test_mixture_names_unknown_corpus(raw):
    raw["stages"][1]["mixture"] = {"cod": 0.9, "english": 0.1}
    assert error(raw) == "stages[1].mixture.cod: unknown corpus (did you mean 'code'?); corpora: english, code"


def test_eval_set_names_unknown_corpus(raw):
    raw["eval"]["sets"]["downstream"] = "codes"
    assert error(raw) == "eval.sets.downstream: unknown corpus 'codes' (did you mean 'code'?); corpora: english, code"


def test_tokenizer_train_corpora_must_exist(raw):
    raw["tokenizer"]["train"]["corpora"] = ["english", "englsh"]
    assert error(raw) == "tokenizer.train.corpora: unknown corpus 'englsh' (did you mean 'english'?)"


def test_duplicate_stage_names(raw):
    raw["stages"][1]["name"] = "pretrain"
    assert error(raw) == "stages[1].name: duplicate stage name 'pretrain'"


def test_no_stages_and_no_corpora(raw):
    assert error({**raw, "stages": []}) == "stages: define at least one stage"
    assert error({**raw, "corpora": {}, "stages": []}) == "corpora: define at least one corpus"


def test_missing_required_top_level_key(raw):
    del raw["stages"]
    assert error(raw) == "stages: required key is missing (ordered training stages)"


def test_scratch_model_without_arch(raw):
    del raw["model"]["arch"]
    assert error(raw) == "model.arch: required when model.init is 'scratch'"


def test_pretrained_model_with_arch(raw):
    raw["model"]["init"] = "some/hf-model"
    assert error(raw).startswith("model.arch: only for model.init: scratch")


def test_arch_heads_must_divide_hidden(raw):
    raw["model"]["arch"]["heads"] = 3
    assert error(raw) == "model.arch.heads: must divide hidden=32"


def test_scratch_model_without_tokenizer(raw):
    del raw["tokenizer"]
    assert error(raw) == "tokenizer: a scratch model needs tokenizer.path or tokenizer.train"


def test_pretrained_model_may_use_its_own_tokenizer(raw):
    raw["model"] = {"init": "some/hf-model"}
    del raw["tokenizer"]
    assert build(Recipe, raw).tokenizer.path is None


def test_tokenizer_path_and_train(raw):
    raw["tokenizer"]["path"] = "some/tokenizer"
    assert error(raw) == "tokenizer.path: give either tokenizer.path or tokenizer.train, not both"


def test_vocab_size_range(raw):
    raw["tokenizer"]["train"]["vocab_size"] = 100
    assert error(raw) == "tokenizer.train.vocab_size: must be in [300, 1000000], got 100"


def test_schedule_kind_literal_violation(raw):
    raw["stages"][0]["schedule"]["kind"] = "cosin"
    assert error(raw) == \
        "stages[0].schedule.kind: 'cosin' is not allowed (did you mean 'cosine'?); expected one of 'cosine', 'wsd', 'infinite', 'constant', 'inverse_sqrt', 'linear'"


def test_other_literal_violations(raw):
    bad = copy.deepcopy(raw)
    bad["train"]["mixed_precision"] = "bf61"
    assert error(bad) == ("train.mixed_precision: 'bf61' is not allowed (did you mean 'bf16'?); "
                          "expected one of 'auto', 'no', 'bf16', 'fp16'")
    raw["corpora"]["code"]["format"] = "jsonlines"
    assert error(raw).startswith("corpora.code.format: 'jsonlines' is not allowed (did you mean 'jsonl'?)")


def test_mixture_not_summing_to_one_warns(raw, caplog):
    raw["stages"][1]["mixture"] = {"code": 3, "english": 1}
    with caplog.at_level(logging.WARNING, logger="cpt.recipe"):
        recipe = build(Recipe, raw)
    assert recipe.stages[1].mixture == {"code": 3.0, "english": 1.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["stages[1].mixture: weights sum to 4, normalising to 1"]


def test_mixture_summing_to_one_does_not_warn(raw, caplog):
    with caplog.at_level(logging.WARNING, logger="cpt.recipe"):
        build(Recipe, raw)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- files ---------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(CptError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"recipe '{path}' does not exist; give the path to a recipe YAML")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel:\n  init: scratch\n  arch: {layers: 2\nstages: []\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"recipe '{path}' is not valid YAML at line 5, column ")
    assert "\n" not in msg


def test_binary_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x80\x81\xff\x00")
    with pytest.raises(RecipeError, match="is not a text file"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["- name: x\n- stages: []\n", "just a string\n", ""])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"recipe '{path}' must be a YAML mapping with keys name, model, corpora, stages, ..."


# --- derived values ------------------------------------------------------------------------------------------

def test_run_dir_substitutes_name(raw):
    raw["run"]["dir"] = "runs/{name}/v1"
    assert build(Recipe, raw).run_dir == Path("runs/tiny/v1")
    del raw["run"]["dir"]
    assert build(Recipe, raw).run_dir == Path("runs/tiny")


def test_fingerprint_is_stable_and_sensitive(raw):
    a, b = build(Recipe, raw), build(Recipe, copy.deepcopy(raw))
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    raw["stages"][1]["mixture"]["english"] = 0.2
    assert build(Recipe, raw).fingerprint() != a.fingerprint()


def test_resolved_config_round_trips(raw):
    recipe = build(Recipe, raw)
    again = build(Recipe, yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again == recipe


# --- shipped recipes -----------------------------------------------------------------------------------------

def test_recipes_exist():
    assert RECIPES, "no recipes/*.yaml found"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe, base = load_recipe(path)
    assert base == path.parent
    assert recipe.name
    assert all(recipe.train.stage_steps(s) > 0 for s in recipe.stages)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweep_validates(path):
    from cpt.sweep import Sweep

    sweep = Sweep(path)  # validates the base recipe under every size's overrides
    config = sweep.config
    assert len(sweep.grid()) == len(config.sizes) * len(config.tokens or [None]) * len(config.ratios) > 1
    assert sweep.base.is_file() and sweep.base.parent == path.parent


# --- cpt check -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`cpt check` on a good and a bad recipe, started together (each pays the import of torch)."""
    root = tmp_path_factory.mktemp("cli")
    good = write_recipe(root / "good.yaml", tiny_recipe(root / "corpora", root / "run"))
    bad_raw = tiny_recipe(root / "corpora", root / "run")
    bad_raw["stage"] = bad_raw.pop("stages")
    bad = write_recipe(root / "bad.yaml", bad_raw)
    commands = {
        "good": [sys.executable, "-m", "cpt", "check", str(good), "train.max_steps=3"],
        "bad": [sys.executable, "-m", "cpt", "check", str(bad)],
    }
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for k, c in commands.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[k] = subprocess.CompletedProcess(commands[k], p.returncode, out, err)
    return results


def test_cli_check_good_recipe(cli_runs):
    run = cli_runs["good"]
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)
    assert resolved["name"] == "tiny"
    assert resolved["train"]["max_steps"] == 3
    assert resolved["stages"][0]["schedule"]["min_lr"] == pytest.approx(1e-3)


def test_cli_check_bad_recipe(cli_runs):
    run = cli_runs["bad"]
    assert run.returncode == 2
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("cpt: error: stage: unknown key (did you mean 'stages'?)")


def test_schedule_longer_than_its_stage_is_an_error(raw):
    raw["stages"][1]["schedule"] = {"kind": "wsd", "peak_lr": 1e-3, "warmup_steps": 5, "cooldown_steps": 500}
    message = error(raw)
    assert message.startswith("stages[1].schedule.cooldown_steps:") and "exceed" in message
