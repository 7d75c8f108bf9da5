"""Tests for cpt.config: building typed dataclasses from dicts, and dotted key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from cpt.config import ConfigValueError, apply_overrides, build, check, field, suggest, to_dict
from cpt.errors import CptError, RecipeError


# Module-level so get_type_hints can resolve the (string) annotations.
@dataclass
class Inner:
    lr: float = field(1e-3, doc="learning rate")
    steps: int = field(10, doc="number of steps")
    kind: Literal["cosine", "linear"] = field("cosine", doc="schedule kind")
    flag: bool = field(False, doc="a switch")
    precision: Literal["auto", "no", "bf16"] = field("auto", doc="precision")

    def __post_init__(self):
        check(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        check(self.lr < 1, "lr", f"must be < 1, got {self.lr}")


@dataclass
class Item:
    name: str = field(doc="item name")
    steps: int = field(1, doc="item steps")


@dataclass
class Outer:
    title: str = field(doc="a required title")
    inner: Inner = field(default_factory=Inner, doc="nested config")
    maybe: Optional[Inner] = field(None, doc="optional nested config")
    count: Optional[int] = field(None, doc="optional count")
    tags: list[str] = field(default_factory=list, doc="tags")
    items: list[Item] = field(default_factory=list, doc="named items")
    weights: dict[str, float] = field(default_factory=dict, doc="name -> weight")


def error(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        build(Outer, data)
    return str(e.value)


def override_error(raw: dict, *overrides: str) -> str:
    with pytest.raises(RecipeError) as e:
        apply_overrides(raw, list(overrides))
    return str(e.value)


# --- build: structure ---------------------------------------------------------------------------------------

def test_build_fills_nested_optional_list_and_dict_fields():
    cfg = build(Outer, {"title": "t", "inner": {"lr": 0.5, "steps": 3, "kind": "linear", "flag": True},
                        "maybe": {"steps": 7}, "count": 4, "tags": ["a", "b"],
                        "items": [{"name": "x"}, {"name": "y", "steps": 2}], "weights": {"a": 1, "b": 0.25}})
    assert cfg.inner == Inner(lr=0.5, steps=3, kind="linear", flag=True)
    assert cfg.maybe == Inner(steps=7)
    assert cfg.count == 4
    assert cfg.tags == ["a", "b"]
    assert cfg.items == [Item("x", 1), Item("y", 2)]
    assert cfg.weights == {"a": 1.0, "b": 0.25}
    assert isinstance(cfg.weights["a"], float)


def test_build_applies_defaults_and_null_sections():
    cfg = build(Outer, {"title": "t", "inner": None})
    assert cfg.inner == Inner()
    assert cfg.maybe is None and cfg.count is None
    assert cfg.tags == [] and cfg.items == [] and cfg.weights == {}


def test_optional_accepts_null():
    cfg = build(Outer, {"title": "t", "maybe": None, "count": None})
    assert cfg.maybe is None and cfg.count is None


def test_to_dict_round_trips():
    cfg = build(Outer, {"title": "t", "items": [{"name": "x"}], "weights": {"a": 1.0}})
    assert build(Outer, to_dict(cfg)) == cfg
    assert to_dict(cfg)["inner"] == {"lr": 1e-3, "steps": 10, "kind": "cosine", "flag": False, "precision": "auto"}


def test_not_a_mapping_lists_allowed_keys():
    msg = str(pytest.raises(RecipeError, build, Outer, ["title"]).value)
    assert msg.startswith("recipe: expected a mapping with keys title, inner, maybe")
    assert "['title']" in msg
    assert error({"title": "t", "inner": 3}).startswith("inner: expected a mapping with keys lr, steps, kind")


# --- build: scalar types ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, 1.5, "3", None])
def test_int_rejects_bool_float_string_and_null(value):
    msg = error({"title": "t", "inner": {"steps": value}})
    assert msg == f"inner.steps: expected an integer, got {value!r}"


@pytest.mark.parametrize("value, expected", [(0, 0.0), (0.5, 0.5), ("1e-3", 1e-3), ("-2.5E-4", -2.5e-4)])
def test_float_accepts_int_float_and_numeric_string(value, expected):
    cfg = build(Outer, {"title": "t", "inner": {"lr": value}})
    assert cfg.inner.lr == expected
    assert type(cfg.inner.lr) is float


@pytest.mark.parametrize("value", [True, False, "fast", [1.0], "inf", "nan", float("inf")])
def test_float_rejects_bool_non_numeric_and_non_finite(value):
    assert error({"title": "t", "inner": {"lr": value}}) == f"inner.lr: expected a finite number, got {value!r}"


@pytest.mark.parametrize("value", [1, 0, "true", "yes"])
def test_bool_is_strict(value):
    assert error({"title": "t", "inner": {"flag": value}}) == f"inner.flag: expected true or false, got {value!r}"


def test_str_rejects_number():
    assert error({"title": 5}) == "title: expected a string, got 5"


def test_optional_int_reports_the_inner_type_error():
    assert error({"title": "t", "count": "many"}) == "count: expected an integer, got 'many'"


def test_literal_violation_suggests_and_lists_allowed():
    msg = error({"title": "t", "inner": {"kind": "cosin"}})
    assert msg == "inner.kind: 'cosin' is not allowed (did you mean 'cosine'?); expected one of 'cosine', 'linear'"


def test_literal_word_that_yaml_reads_as_bool_is_taken_back():
    # YAML 1.1 turns `precision: no` into False; the Literal allows "no", so that is what was meant.
    assert build(Outer, {"title": "t", "inner": {"precision": False}}).inner.precision == "no"
    msg = error({"title": "t", "inner": {"precision": True}})
    assert msg.startswith("inner.precision: True is not allowed")
    assert "expected one of 'auto', 'no', 'bf16'" in msg


def test_list_and_dict_type_errors_name_the_element():
    assert error({"title": "t", "tags": "a"}) == "tags: expected a list of a string, got 'a'"
    assert error({"title": "t", "tags": ["a", 2]}) == "tags[1]: expected a string, got 2"
    assert error({"title": "t", "weights": [1.0]}).startswith("weights: expected a mapping of names to a number")
    assert error({"title": "t", "weights": {"a": "heavy"}}) == "weights.a: expected a finite number, got 'heavy'"


# --- build: keys --------------------------------------------------------------------------------------------

def test_unknown_nested_key_has_full_path_suggestion_and_allowed_keys():
    msg = error({"title": "t", "inner": {"lrr": 0.1}})
    assert msg == ("inner.lrr: unknown key (did you mean 'lr'?); "
                   "allowed: lr, steps, kind, flag, precision")


def test_unknown_key_three_levels_deep():
    @dataclass
    class Top:
        outer: Outer = field(doc="outer")

    with pytest.raises(RecipeError) as e:
        build(Top, {"outer": {"title": "t", "inner": {"lr_": 0.1}}})
    assert str(e.value).startswith("outer.inner.lr_: unknown key (did you mean 'lr'?); allowed: lr, steps")


def test_unknown_key_without_close_match_has_no_suggestion():
    msg = error({"title": "t", "zzzz": 1})
    assert msg == "zzzz: unknown key; allowed: title, inner, maybe, count, tags, items, weights"


def test_missing_required_key_names_path_and_doc():
    assert error({}) == "title: required key is missing (a required title)"
    assert error({"title": "t", "items": [{"name": "a"}, {"steps": 3}]}) == \
        "items[1].name: required key is missing (item name)"


def test_post_init_error_is_prefixed_with_path():
    assert error({"title": "t", "inner": {"steps": 0}}) == "inner.steps: must be positive, got 0"
    assert error({"title": "t", "maybe": {"lr": 2}}) == "maybe.lr: must be < 1, got 2.0"


def test_list_index_in_path():
    @dataclass
    class Staged:
        stages: list[Inner] = field(doc="stages")

    with pytest.raises(RecipeError) as e:
        build(Staged, {"stages": [{"steps": 1}, {"steps": -2}]})
    assert str(e.value) == "stages[1].steps: must be positive, got -2"
    with pytest.raises(RecipeError) as e:
        build(Staged, {"stages": [{}, {"stepz": 2}]})
    assert str(e.value).startswith("stages[1].stepz: unknown key (did you mean 'steps'?)")


def test_recipe_error_is_a_cpt_error():
    assert issubclass(RecipeError, CptError)


def test_check_and_config_value_error():
    check(True, "k", "never raised")
    with pytest.raises(ConfigValueError) as e:
        check(False, "k", "bad k")
    assert e.value.key == "k" and str(e.value) == "bad k"
    assert isinstance(e.value, ValueError)


def test_suggest():
    assert suggest("stage", ["stages", "train"]) == " (did you mean 'stages'?)"
    assert suggest("qqq", ["stages", "train"]) == ""


# --- apply_overrides ----------------------------------------------------------------------------------------

def raw() -> dict:
    return {"name": "r", "train": {"max_steps": 10, "lr": 0.1},
            "stages": [{"name": "pretrain", "steps": 5}, {"name": "cpt", "steps": 6}]}


def test_override_nested_value():
    out = apply_overrides(raw(), ["train.max_steps=3"])
    assert out["train"] == {"max_steps": 3, "lr": 0.1}


def test_override_creates_missing_and_null_mappings():
    out = apply_overrides({"a": None}, ["x.y.z=1", "a.b=2"])
    assert out == {"a": {"b": 2}, "x": {"y": {"z": 1}}}


def test_override_list_by_index_and_by_name():
    out = apply_overrides(raw(), ["stages.0.steps=20", "stages.cpt.steps=30", "stages.-1.name=late"])
    assert out["stages"] == [{"name": "pretrain", "steps": 20}, {"name": "late", "steps": 30}]


def test_override_by_name_skips_elements_without_a_name():
    out = apply_overrides({"s": [5, {"name": "a", "v": 1}]}, ["s.a.v=2"])
    assert out == {"s": [5, {"name": "a", "v": 2}]}


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("0.5", 0.5), ("1e-3", "1e-3"), ("1.0e-3", 1e-3), ("true", True), ("false", False),
    ("[1, 2]", [1, 2]), ("null", None), ("~", None), ("hello", "hello"), ("'3'", "3"), ("", ""),
    ("a=b", "a=b"), ("{k: 1}", {"k": 1}),
])
def test_override_values_are_yaml(text, value):
    out = apply_overrides(raw(), [f"train.lr={text}"])
    assert out["train"]["lr"] == value
    assert type(out["train"]["lr"]) is type(value)


def test_override_then_build_accepts_yaml_11_float_string():
    out = apply_overrides({"title": "t"}, ["inner.lr=1e-3"])
    assert build(Outer, out).inner.lr == 1e-3


def test_override_replaces_whole_list():
    out = apply_overrides(raw(), ["stages=[]"])
    assert out["stages"] == []


def test_override_without_equals():
    assert override_error(raw(), "train.max_steps") == \
        "override 'train.max_steps': expected key=value, e.g. train.max_steps=20"


def test_override_empty_segment():
    assert override_error(raw(), "train..max_steps=3") == \
        "override 'train..max_steps=3': empty key segment in 'train..max_steps'"


@pytest.mark.parametrize("index", ["2", "-3"])
def test_override_bad_index(index):
    assert override_error(raw(), f"stages.{index}.steps=1") == \
        f"override stages.{index}: index {index} out of range (list has 2 entries)"


@pytest.mark.parametrize("segment", ["--1", "²"])
def test_override_odd_index_is_a_name_not_a_crash(segment):
    assert override_error(raw(), f"stages.{segment}.steps=1").startswith(f"override stages.{segment}: no entry named")


def test_override_unknown_element_name_suggests():
    msg = override_error(raw(), "stages.cpu.steps=1")
    assert msg == ("override stages.cpu: no entry named 'cpu' (did you mean 'cpt'?); "
                   "use an index 0..1 or one of ['pretrain', 'cpt']")


def test_override_into_scalar():
    assert override_error(raw(), "train.max_steps.x=1") == \
        "override 'train.max_steps.x=1': 'train.max_steps' is a value, not a mapping or list"
    assert override_error(raw(), "name.first=1") == "override 'name.first=1': 'name' is a value, not a mapping or list"


def test_override_invalid_yaml_value():
    msg = override_error(raw(), "train.lr=[1,")
    assert msg.startswith("override 'train.lr=[1,': the value is not valid YAML")
