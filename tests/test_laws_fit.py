"""The shared fitter: recovery, robustness of the Huber loss, bounds reported, non-convergence, grouped CV."""

from __future__ import annotations

import numpy as np
import pytest

from cpt.errors import CptError
from cpt.laws.fit import FitConfig, Form, Param, cross_validate, describe_bounds, fit, huber, r2_rmse

# A Chinchilla-style law in one variable: L = E + A / x^alpha.
POWER = Form("power", "L = E + A/x^alpha", ("x",),
             (Param("E", 1e-6, 100.0, log=True), Param("A", 1e-6, 1e6, log=True),
              Param("alpha", 1e-3, 1.0, (0.1, 0.5, 0.9))),
             lambda x, E, A, alpha: E + A / x["x"] ** alpha)
X = {"x": np.geomspace(1e3, 1e7, 30)}
TRUE = {"E": 1.7, "A": 40.0, "alpha": 0.34}


def test_huber_is_quadratic_inside_delta_and_linear_outside():
    np.testing.assert_allclose(huber(np.array([0.5e-3, -2e-3, 1e-2]), 1e-3),
                               [0.5 * 0.25e-6, 1e-3 * (2e-3 - 0.5e-3), 1e-3 * (1e-2 - 0.5e-3)])
    np.testing.assert_allclose(huber(np.array([3.0]), np.inf), [4.5])


def test_r2_rmse_against_their_definitions():
    obs, pred = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.1, 1.9, 3.2, 3.9])
    r2, rmse = r2_rmse(pred, obs)
    assert r2 == pytest.approx(1 - 0.07 / 5.0) and rmse == pytest.approx(np.sqrt(0.07 / 4))


@pytest.mark.parametrize("method", ["lbfgsb", "trf"])
def test_recovers_parameters_without_noise(method):
    result = fit(POWER, X, POWER.predict(TRUE, X), FitConfig(method=method))
    assert result.params == pytest.approx(TRUE, rel=1e-5)
    assert result.r2 == pytest.approx(1.0, abs=1e-10) and result.rmse < 1e-6 and result.on_bound == []
    assert result.converged and 1 <= result.converged_starts <= result.starts


def test_recovers_parameters_with_noise_and_ignores_an_outlier():
    y = POWER.predict(TRUE, X) * np.exp(0.002 * np.random.default_rng(0).standard_normal(len(X["x"])))
    y[7] *= 1.3  # one broken eval: Huber weighs it linearly, least squares quadratically
    robust = fit(POWER, X, y)
    squares = fit(POWER, X, y, FitConfig(huber_delta=np.inf))
    assert robust.params == pytest.approx(TRUE, rel=0.05)
    err = {k: abs(v / TRUE[k] - 1) for k, v in robust.params.items()}
    assert max(err.values()) < max(abs(v / TRUE[k] - 1) for k, v in squares.params.items())


def test_huber_objective_reported_is_the_mean_huber_of_log_residuals():
    y = POWER.predict(TRUE, X) * np.exp(0.01 * np.random.default_rng(1).standard_normal(len(X["x"])))
    result = fit(POWER, X, y)
    res = np.log(result.predict(X)) - np.log(y)
    assert result.huber == pytest.approx(float(huber(res, 1e-3).mean()))
    assert (result.r2, result.rmse) == pytest.approx(r2_rmse(result.predict(X), y))


def test_parameter_on_a_bound_is_reported():
    # True exponent 1.6 beyond the box's 1.0: the fit pins alpha to its upper bound and says so.
    y = POWER.predict({"E": 1.7, "A": 4e5, "alpha": 1.6}, X)
    result = fit(POWER, X, y)
    assert result.params["alpha"] == pytest.approx(1.0)
    assert result.on_bound == [{"param": "alpha", "value": pytest.approx(1.0), "bound": "upper", "limit": 1.0}]
    assert describe_bounds(result.on_bound) == "alpha on its upper bound (1)"
    assert result.to_dict()["on_bound"] == result.on_bound


def test_no_converged_start_is_an_error():
    y = POWER.predict(TRUE, X) * np.exp(0.01 * np.random.default_rng(2).standard_normal(len(X["x"])))
    with pytest.raises(CptError, match="L-BFGS-B did not converge from any of 3 starts within 2 iterations"):
        fit(POWER, X, y, FitConfig(max_iter=2, screen_iter=1))


def test_too_few_points_and_bad_observations():
    with pytest.raises(CptError, match="has 3 parameters but only 2 data points"):
        fit(POWER, {"x": np.array([1.0, 2.0])}, np.array([1.0, 2.0]))
    with pytest.raises(CptError, match="finite and > 0"):
        fit(POWER, X, np.where(X["x"] > 1e5, -1.0, 2.0))


def test_grid_option_is_checked():
    y = POWER.predict(TRUE, X)
    with pytest.raises(CptError, match="names beta, which power does not have"):
        fit(POWER, X, y, FitConfig(grid={"beta": (0.1,)}))
    with pytest.raises(CptError, match="outside its bounds"):
        fit(POWER, X, y, FitConfig(grid={"alpha": (2.0,)}))
    assert fit(POWER, X, y, FitConfig(grid={"alpha": (0.2,)})).params == pytest.approx(TRUE, rel=1e-5)


def test_grouped_cross_validation_holds_out_each_value_once():
    x = np.repeat(np.geomspace(1e3, 1e7, 6), 3)
    y = POWER.predict(TRUE, {"x": x}) * np.exp(0.003 * np.random.default_rng(3).standard_normal(len(x)))
    cv = cross_validate(POWER, {"x": x}, y, x, "size", 3)
    held = sorted(v for fold in cv.per_fold for v in fold["held_out"])
    assert held == pytest.approx(sorted(np.unique(x)))
    assert [f["n"] for f in cv.per_fold] == [6, 6, 6]
    assert cv.r2 > 0.99 and cv.rmse < 0.05
    # Held-out RMSE of noisy data cannot beat the in-sample fit.
    assert cv.rmse >= fit(POWER, {"x": x}, y).rmse
    with pytest.raises(CptError, match="needs 2 <= folds <= the 6 distinct size values"):
        cross_validate(POWER, {"x": x}, y, x, "size", 7)


def test_cross_validation_fold_check_message_names_the_fold():
    x = np.repeat(np.geomspace(1e3, 1e7, 4), 3)
    y = POWER.predict(TRUE, {"x": x})

    def check(train):
        if len(np.unique(x[train])) < 4:
            raise CptError("needs >= 4 sizes")

    with pytest.raises(CptError, match=r"cross-validation by size, fold 1/2 \(holding out size = 1000, 464159\): "
                                       "needs >= 4 sizes"):
        cross_validate(POWER, {"x": x}, y, x, "size", 2, check=check)
