import pytest
import torch

from cpt.config import build
from cpt.errors import RecipeError
from cpt.methods.l2 import L2InitConfig, L2ToInit


def test_penalty_value_and_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)  # frozen parameters are not pulled
    l2 = L2ToInit(model, 0.5)
    assert l2.penalty(model).item() == 0.0
    with torch.no_grad():
        model[0].weight += 0.1  # 6 entries moved by 0.1
        model[0].bias -= 0.2    # 2 entries moved by 0.2
        model[1].weight += 5.0
    penalty = l2.penalty(model)
    assert penalty.item() == pytest.approx(0.5 * (6 * 0.1**2 + 2 * 0.2**2))
    penalty.backward()
    assert torch.allclose(model[0].weight.grad, torch.full((2, 3), 0.5 * 2 * 0.1))
    assert model[1].weight.grad is None


def test_reference_is_a_copy_and_names_select_parameters():
    model = torch.nn.Linear(2, 2)
    l2 = L2ToInit(model, 1.0, names={"bias"})
    assert set(l2.reference) == {"bias"}
    with torch.no_grad():
        model.bias += 1.0
    assert l2.penalty(model).item() == pytest.approx(2.0)


def test_lambda_must_be_non_negative():
    with pytest.raises(RecipeError, match="l2_init.lambda: must be >= 0"):
        build(L2InitConfig, {"lambda": -1}, "l2_init")
