"""The per-stage ``merge`` option: the stage's final checkpoint holds the merge of its end weights (checked against
the same run without the merge, whose end weights are those), the next stage starts from it, and a run cut back
to a mid-stage checkpoint or to the stage boundary resumes with identical rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import comparable, read_rows as rows_of, run_cpt as cpt, tiny_recipe, write_recipe
from cpt.config import build
from cpt.methods.stage_merge import StageMergeConfig, checkpoint_steps, merged_weights

# pretrain: global steps 1-8; cpt: 9-20 (checkpoints every 4: 12 and 16 mid-stage, 20 final); after: 21-24
AVERAGE = {"kind": "average", "last": 3}
ALPHA = 0.75


def test_checkpoint_steps_follow_the_cadence():
    assert checkpoint_steps(8, 12, 4) == [12, 16]
    assert checkpoint_steps(0, 8, 4) == [4]
    assert checkpoint_steps(8, 12, None) == []


def test_merged_weights_by_hand(tmp_path):
    end = {"w": torch.tensor([1.0, 2.0]), "lm_head.weight": torch.tensor([[3.0]]),
           "model.embed_tokens.weight": torch.tensor([[3.0]])}
    start = {"w": torch.tensor([5.0, 6.0]), "lm_head.weight": torch.tensor([[7.0]]),
             "model.embed_tokens.weight": torch.tensor([[7.0]])}
    out = merged_weights(build(StageMergeConfig, {"kind": "interpolate", "alpha": 0.25}), end, start, [])
    torch.testing.assert_close(out["w"], torch.tensor([4.0, 5.0]))  # 0.75 * start + 0.25 * end
    for i, value in enumerate((4.0, 7.0)):
        (tmp_path / str(i)).mkdir()
        # a tied checkpoint saves the embedding only
        save_file({"w": torch.tensor([value, value]), "model.embed_tokens.weight": torch.tensor([[value]])},
                  tmp_path / str(i) / "model.safetensors")
    out = merged_weights(build(StageMergeConfig, AVERAGE), end, None, [tmp_path / "0", tmp_path / "1"])
    torch.testing.assert_close(out["w"], torch.tensor([4.0, 13 / 3]))
    torch.testing.assert_close(out["lm_head.weight"], torch.tensor([[14 / 3]]))


@pytest.mark.parametrize("change, message", [
    ({"merge": {"kind": "average", "last": 1}}, "stages[1].merge.last: average needs last >= 2"),
    ({"merge": {"kind": "interpolate", "alpha": 1.5}}, "stages[1].merge.alpha: interpolate needs alpha in [0, 1]"),
    ({"merge": {"kind": "interpolate", "alpha": 0.5, "last": 2}}, "stages[1].merge.last: is an average option"),
    ({"merge": {"kind": "average", "last": 3}, "__every": None}, "stages[1].merge.last: averaging 3 checkpoints needs 2"),
    ({"merge": {"kind": "average", "last": 4}}, "stages[1].merge.last: averaging 4 checkpoints needs 3 mid-stage"),
    ({"merge": {"kind": "average", "last": 3}, "__keep": 1}, "checkpoint.keep_last: must be >= 2"),
    ({"merge": AVERAGE, "lora": {"rank": 2}}, "stages[1].merge: merges whole weights"),
    ({"merge": AVERAGE, "__next_keeps_optimizer": True}, "stages[2].reset_optimizer: false does not follow a merge"),
])
def test_bad_merge_options_are_one_line_at_check(change, message, tiny_corpora, tmp_path):
    recipe = merge_recipe(tiny_corpora, tmp_path / "run", {})
    change = dict(change)
    if "__every" in change:
        recipe["checkpoint"]["every"] = change.pop("__every")
    if "__keep" in change:
        recipe["checkpoint"]["keep_last"] = change.pop("__keep")
    if change.pop("__next_keeps_optimizer", False):
        recipe["stages"][2]["reset_optimizer"] = False
    recipe["stages"][1].update(change)
    result = cpt("check", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def merge_recipe(corpora, run_dir, merge: dict) -> dict:
    recipe = tiny_recipe(corpora, run_dir, pretrain=8, cpt=12)
    recipe["stages"][1].update(merge)
    recipe["stages"].append(recipe["stages"][1] | {"name": "after", "steps": 4, "merge": None})
    recipe["checkpoint"] = {"every": 4, "keep_last": 3}
    recipe["eval"]["every"] = 4
    return recipe


@pytest.fixture(scope="module")
def runs(tiny_corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_merge")
    out = {}
    for name, merge in (("plain", {}), ("average", {"merge": AVERAGE}),
                        ("interpolate", {"merge": {"kind": "interpolate", "alpha": ALPHA}})):
        path = write_recipe(root / f"{name}.yaml", merge_recipe(tiny_corpora, root / name, merge))
        result = cpt("run", str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = (root / name, result.stderr)
    return out


def weights(run_dir, stage, step):
    return load_file(run_dir / "checkpoints" / stage / f"step-{step}" / "model.safetensors")


def test_average_and_interpolation_of_the_stage_end(runs):
    plain, average, interpolate = runs["plain"][0], runs["average"][0], runs["interpolate"][0]
    end, start = weights(plain, "cpt", 20), weights(plain, "pretrain", 8)
    # before the merge both runs trained identically: same mid-stage checkpoints
    assert all(torch.equal(weights(average, "cpt", 12)[k], weights(plain, "cpt", 12)[k]) for k in end)
    mid = weights(average, "cpt", 12), weights(average, "cpt", 16)
    for k in end:
        torch.testing.assert_close(weights(average, "cpt", 20)[k], (mid[0][k] + mid[1][k] + end[k]) / 3,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(weights(interpolate, "cpt", 20)[k], (1 - ALPHA) * start[k] + ALPHA * end[k],
                                   rtol=0, atol=1e-6)
    assert not torch.equal(weights(average, "cpt", 20)["model.norm.weight"], end["model.norm.weight"])


def test_merge_rows_and_the_next_stage_starts_from_the_merge(runs):
    run_dir, log = runs["average"]
    rows = rows_of(run_dir)
    merges = {r["set"]: r for r in rows if r["kind"] == "merge"}
    assert set(merges) == {"upstream", "downstream"} and all(r["step"] == 20 and r["method"] == "average"
                                                               for r in merges.values())
    last_eval = {r["set"]: r["loss"] for r in rows if r["kind"] == "eval" and r["stage"] == "cpt"}
    assert all(merges[s]["loss_before"] == last_eval[s] for s in merges)
    after_start = {r["set"]: r["loss"] for r in rows if r["kind"] == "eval" and r["stage"] == "after"
                   and r["stage_step"] == 0}
    assert after_start == {s: r["loss"] for s, r in merges.items()}
    assert "merge at the end of 'cpt' (average of the last 3 checkpoints)" in log


@pytest.mark.parametrize("kind, cut", [("average", "cpt/step-16"), ("average", "cpt/step-20"),
                                       ("interpolate", "cpt/step-16")])
def test_resume_mid_stage_and_at_the_boundary(runs, tmp_path, kind, cut):
    run_dir = runs[kind][0]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    cut_step = int(cut.split("-")[1])
    for path in copy.glob("checkpoints/*/step-*"):
        if int(path.name[5:]) > cut_step:
            shutil.rmtree(path)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(str(run_dir), str(copy)))
    result = cpt("resume", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {copy / 'checkpoints' / cut}" in result.stderr
    assert comparable(rows_of(copy)) == comparable(rows_of(run_dir))
    final = json.loads((copy / "checkpoints" / "after" / "step-24" / "meta.json").read_text())
    assert final["stage_complete"]
