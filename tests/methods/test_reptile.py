import pytest
import torch

from conftest import run_cpt as cpt, tiny_recipe, write_recipe
from cpt.config import build
from cpt.errors import CptError, RecipeError
from cpt.methods.reptile import ReptileConfig, Reptile


def model_and_reptile(every: int, beta: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)  # frozen parameters are not meta-updated (nor stored)
    return model, Reptile(model, ReptileConfig(every=every, beta=beta))


def test_meta_update_keeps_a_beta_share_of_the_interval_and_moves_the_anchor():
    model, reptile = model_and_reptile(every=3, beta=0.25)
    assert set(reptile.anchor) == {"0.weight", "0.bias", "1.bias"}
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight += 0.8
        model[0].bias -= 0.4
    assert not reptile.step(model, 1, 10) and not reptile.step(model, 2, 10)  # inside the interval: untouched
    assert torch.equal(model[0].weight, start["0.weight"] + 0.8)
    assert reptile.step(model, 3, 10)
    # theta_prev + beta (theta - theta_prev): a quarter of the +0.8 and -0.4 moves is kept
    torch.testing.assert_close(model[0].weight, start["0.weight"] + 0.2, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[0].bias, start["0.bias"] - 0.1, rtol=0, atol=1e-6)
    assert torch.equal(model[1].bias, start["1.bias"])
    assert torch.equal(reptile.anchor["0.weight"], model[0].weight)  # the next interval starts here
    with torch.no_grad():
        model[0].weight += 0.4
    reptile.step(model, 6, 10)
    torch.testing.assert_close(model[0].weight, start["0.weight"] + 0.3, rtol=0, atol=1e-6)


def test_the_stage_s_last_step_closes_an_interval_and_beta_one_is_plain_training():
    model, reptile = model_and_reptile(every=4, beta=1.0)
    with torch.no_grad():
        model[0].bias += 1.0
    moved = model[0].bias.detach().clone()
    assert not reptile.step(model, 5, 7) and reptile.step(model, 7, 7)
    assert torch.equal(model[0].bias, moved)


def test_anchor_round_trips_through_a_checkpoint_directory(tmp_path):
    model, reptile = model_and_reptile(every=2, beta=0.5)
    reptile.save(tmp_path)
    other, _ = model_and_reptile(every=2, beta=0.5)
    with torch.no_grad():
        other[0].weight += 3.0
    restored = Reptile(other, ReptileConfig(every=2, beta=0.5))
    restored.load(tmp_path)
    assert all(torch.equal(restored.anchor[k], reptile.anchor[k]) for k in reptile.anchor)
    with pytest.raises(CptError, match="has no reptile.safetensors"):
        restored.load(tmp_path / "missing")


@pytest.mark.parametrize("options, message", [
    ({"every": 0, "beta": 0.5}, "reptile.every: must be an integer >= 1"),
    ({"every": 10, "beta": 0.0}, "reptile.beta: must be in (0, 1]"),
    ({"every": 10, "beta": 1.5}, "reptile.beta: must be in (0, 1]"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build(ReptileConfig, options, "reptile")


def test_cpt_check_refuses_reptile_every_below_one_in_one_line(tiny_corpora, tmp_path):
    recipe = tiny_recipe(tiny_corpora, tmp_path / "run")
    recipe["stages"][1]["reptile"] = {"every": 0, "beta": 0.5}
    result = cpt("check", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 2
    assert "stages[1].reptile.every: must be an integer >= 1" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
