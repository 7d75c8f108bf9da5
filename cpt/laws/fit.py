"""A robust fitter for loss laws: Huber loss on log-loss residuals, L-BFGS-B from a grid of starts, best kept.

This is the Chinchilla recipe (Hoffmann et al. 2022, App. D.2) that the D-CPT Law paper (Que et al. 2024) fits
with: minimise ``sum_i Huber_delta(log pred_i - log obs_i)`` (delta 1e-3) with L-BFGS from a grid of initial
points and keep the best; see ``shared/REFERENCES.md`` §5.

Optimiser. The default is scipy's L-BFGS-B, as the papers use, rather than ``torch.optim.LBFGS`` over
log-parameters: the laws need box bounds (all D-CPT parameters > 0, exponents kept in a sane range) and we must
*report* a parameter that ends on its bound. L-BFGS-B enforces the box exactly, so "on a bound" is a plain
comparison; a log-parameterisation only keeps parameters positive and lets an ill-posed one drift towards 0 or
infinity unseen. Positive coefficients are still optimised as logarithms (``Param.log``) so that one step size
fits coefficients spanning decades. ``method="trf"`` minimises the same Huber objective with scipy's
trust-region-reflective ``least_squares`` (``loss="huber"``, same bounds): a Gauss-Newton method, which follows
the long flat valleys of these laws (D-CPT's E, C, gamma and eps trade off against each other) in a few dozen
steps where L-BFGS-B needs hundreds (but it can stall on the CMR's two-power form); offered for large tables
and as a cross-check.

Starts. A law declares which parameters enter it linearly (``Param.grid`` empty: coefficients such as D-CPT's
E, A, B, C). The grid covers the nonlinear ones (exponents); at each grid point the linear coefficients are set
by bounded least squares, weighted by ``1/obs`` so that it approximates the log-residual fit. The Huber objective
is evaluated at every grid point and L-BFGS-B runs from the ``starts`` best ones (``starts=0``: from all), first
for ``screen_iter`` iterations each; the ``finalists`` best of those that have not converged by then, and are
still below every start that has, continue to convergence; the others are dropped. This is successive halving:
a start sliding down a degenerate direction, such as ``a*R^s + b`` with ``s -> 0`` and ``|a|, |b| -> inf``, would
otherwise take hundreds of iterations to lose. The gradient is analytic in the residuals and central differences
of the law's prediction, evaluated in one vectorised call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
from scipy.optimize import least_squares, lsq_linear, minimize
from threadpoolctl import threadpool_limits

from cpt.config import suggest
from cpt.errors import CptError

Inputs = dict[str, np.ndarray]
# L-BFGS-B stopping rules on the scaled objective (about 1 per row at residuals of delta): stop when an iteration
# gains less than FTOL, or the largest projected gradient component is below GTOL. Looser ones stop halfway along
# the flat valleys of these laws, at a good fit with wrong parameters.
FTOL, GTOL = 1e-10, 1e-9
METHODS = ("lbfgsb", "trf")


@dataclass(frozen=True)
class Param:
    """One law parameter with its box ``[lo, hi]``.

    ``grid`` holds start values for a nonlinear parameter; an empty grid marks a coefficient the law is affine
    in, set by least squares at each start. ``log`` optimises ``log(value)`` (positive coefficients).
    """

    name: str
    lo: float
    hi: float
    grid: tuple[float, ...] = ()
    log: bool = False

    @property
    def linear(self) -> bool:
        return not self.grid


@dataclass(frozen=True)
class Form:
    """A law's functional form: ``fn(inputs, **params)`` broadcasts parameter arrays of shape ``(k, 1)`` against
    input columns of shape ``(n,)`` and returns predictions of shape ``(k, n)``.

    ``residual="log"`` fits ``log pred - log obs`` (losses, as Chinchilla); ``"linear"`` fits ``pred - obs``, for
    targets that may be zero or negative (loss *changes*, ratios).
    """

    name: str
    formula: str
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    fn: Callable[..., np.ndarray]
    residual: Literal["log", "linear"] = "log"

    def predict(self, params: dict[str, float], inputs: Inputs) -> np.ndarray:
        """The law at fitted ``params`` for the input columns (broadcast against each other)."""
        columns = {k: np.asarray(v, dtype=float) for k, v in inputs.items()}
        return self.fn(columns, **{p.name: float(params[p.name]) for p in self.params})


@dataclass
class FitConfig:
    """How to fit: the Huber delta, the start grid (overrides of ``Param.grid`` by name), how many grid points
    L-BFGS-B starts from, its iteration cap, and when a parameter counts as sitting on a bound."""

    huber_delta: float = 1e-3
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    starts: int = 8
    max_iter: int = 3000
    screen_iter: int = 100
    finalists: int = 3
    method: str = "lbfgsb"
    polish: bool = True
    bound_tol: float = 1e-4  # fraction of the (log-)box width

    def __post_init__(self):
        if not self.huber_delta > 0:
            raise CptError(f"huber delta must be > 0, got {self.huber_delta}")
        if self.starts < 0 or self.max_iter < 1 or self.screen_iter < 1 or self.finalists < 1:
            raise CptError(f"starts must be >= 0 and max_iter, screen_iter, finalists >= 1; got {self.starts}, "
                           f"{self.max_iter}, {self.screen_iter}, {self.finalists}")
        if self.method not in METHODS:
            raise CptError(f"fit method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def to_dict(self) -> dict:
        return {"huber_delta": self.huber_delta, "grid": {k: list(v) for k, v in self.grid.items()},
                "starts": self.starts, "max_iter": self.max_iter, "screen_iter": self.screen_iter,
                "finalists": self.finalists, "method": self.method, "polish": self.polish}


@dataclass
class FitResult:
    """A fitted law: parameters, fit quality on the loss scale, and honesty flags.

    ``huber`` is the mean Huber loss of the residuals at the optimum; ``r2`` and ``rmse`` compare predictions
    with observations in loss units. ``on_bound`` lists parameters that ended on their box.
    """

    form: Form
    params: dict[str, float]
    huber: float
    r2: float
    rmse: float
    converged: bool
    on_bound: list[dict]
    n: int
    starts: int
    converged_starts: int

    def predict(self, inputs: Inputs) -> np.ndarray:
        return self.form.predict(self.params, inputs)

    def to_dict(self) -> dict:
        return {"form": self.form.name, "formula": self.form.formula, "params": self.params, "huber": self.huber,
                "r2": self.r2, "rmse": self.rmse, "converged": self.converged, "on_bound": self.on_bound,
                "n": self.n, "starts": self.starts, "converged_starts": self.converged_starts}

    @classmethod
    def from_dict(cls, data: dict, form: Form) -> "FitResult":
        missing = [p.name for p in form.params if p.name not in data.get("params", {})]
        if missing:
            raise CptError(f"fit of {form.name} lacks parameter(s) {', '.join(missing)}")
        return cls(form, {k: float(v) for k, v in data["params"].items()}, data["huber"], data["r2"], data["rmse"],
                   data["converged"], data["on_bound"], data["n"], data["starts"], data["converged_starts"])


def huber(res: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: ``res**2 / 2`` within ``delta``, linear beyond (``delta = inf`` is least squares)."""
    a = np.abs(res)
    return np.where(a <= delta, 0.5 * res ** 2, delta * (a - 0.5 * delta))


def r2_rmse(pred: np.ndarray, obs: np.ndarray) -> tuple[float, float]:
    """Coefficient of determination and root-mean-square error of ``pred`` against ``obs``."""
    ss_res = float(np.sum((pred - obs) ** 2))
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("-inf"))
    return r2, float(np.sqrt(ss_res / len(obs)))


class _Problem:
    """The objective in optimisation space ``z`` (log for ``Param.log``), with its gradient."""

    def __init__(self, form: Form, inputs: Inputs, y: np.ndarray, delta: float):
        self.form, self.inputs, self.y, self.delta = form, inputs, y, delta
        self.logs = np.array([p.log for p in form.params])
        self.lo = np.array([np.log(p.lo) if p.log else p.lo for p in form.params])
        self.hi = np.array([np.log(p.hi) if p.log else p.hi for p in form.params])
        # Scale so that residuals of about delta weigh about 1: L-BFGS-B's stopping rules assume objectives of
        # order 1, and an unscaled Huber loss of log residuals is ~1e-7.
        self.scale = 1.0 / (len(y) * min(delta, 1e-2) ** 2)

    def values(self, z: np.ndarray) -> np.ndarray:
        """``(k, P)`` optimisation points -> parameter values."""
        return np.where(self.logs, np.exp(np.minimum(z, 700.0)), z)

    def predict(self, z: np.ndarray) -> np.ndarray:
        v = self.values(np.atleast_2d(z))
        with np.errstate(all="ignore"):
            return self.form.fn(self.inputs, **{p.name: v[:, [i]] for i, p in enumerate(self.form.params)})

    def residuals(self, pred: np.ndarray) -> np.ndarray:
        if self.form.residual == "log":
            with np.errstate(all="ignore"):
                return np.log(np.maximum(pred, 1e-300)) - np.log(self.y)
        return pred - self.y

    def objective(self, z: np.ndarray) -> np.ndarray:
        """Scaled Huber objective at each row of ``z``; non-finite predictions give ``inf``."""
        res = self.residuals(self.predict(z))
        out = self.scale * huber(res, self.delta).sum(axis=-1)
        return np.where(np.isfinite(out), out, np.inf)

    def residuals_jacobian(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residuals ``(n,)`` and their derivatives ``(P, n)``: central differences of the prediction, all
        ``2P + 1`` points in one vectorised call."""
        P = len(z)
        h = 1e-6 * (1.0 + np.abs(z))
        points = np.tile(z, (2 * P + 1, 1))
        points[1 + 2 * np.arange(P), np.arange(P)] += h
        points[2 + 2 * np.arange(P), np.arange(P)] -= h
        pred = self.predict(points)
        dpred = (pred[1::2] - pred[2::2]) / (2 * h[:, None])
        dres = dpred / np.maximum(pred[0], 1e-300) if self.form.residual == "log" else dpred
        return self.residuals(pred[0]), dres

    def value_and_grad(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        res, dres = self.residuals_jacobian(z)
        with np.errstate(all="ignore"):
            g = self.scale * (np.clip(res, -self.delta, self.delta) * dres).sum(axis=1)
            f = self.scale * float(huber(res, self.delta).sum())
        return (f, g) if np.isfinite(f) and np.all(np.isfinite(g)) else (1e30, np.zeros(len(z)))

    def minimise(self, z0: np.ndarray, method: str, max_iter: int):
        """One local fit from ``z0``: ``(z, scaled objective, converged, message)``."""
        if method == "lbfgsb":
            res = minimize(self.value_and_grad, z0, jac=True, method="L-BFGS-B", bounds=list(zip(self.lo, self.hi)),
                           options={"maxiter": max_iter, "ftol": FTOL, "gtol": GTOL})
            return res.x, float(res.fun), bool(res.success), str(res.message)
        inside = 1e-9 * (self.hi - self.lo)  # trf starts strictly inside the box
        z0 = np.clip(z0, self.lo + inside, self.hi - inside)
        delta = self.delta if np.isfinite(self.delta) else None
        with np.errstate(all="ignore"):
            res = least_squares(lambda z: self.residuals_jacobian(z)[0], z0,
                                jac=lambda z: self.residuals_jacobian(z)[1].T, bounds=(self.lo, self.hi),
                                loss="huber" if delta else "linear", f_scale=delta or 1.0, x_scale="jac",
                                max_nfev=max_iter)
        f = self.scale * float(huber(res.fun, self.delta).sum())
        return res.x, f, bool(res.status > 0 and np.isfinite(f)), str(res.message)


def _grid_points(form: Form, config: FitConfig) -> np.ndarray:
    """Cartesian product of the start grid, ``(k, P)`` in optimisation space; linear parameters are NaN."""
    names = [p.name for p in form.params]
    unknown = sorted(set(config.grid) - set(names))
    if unknown:
        raise CptError(f"--grid names {', '.join(unknown)}{suggest(unknown[0], names)}, which {form.name} does not "
                       f"have; its parameters are {', '.join(names)}")
    axes = []
    for p in form.params:
        values = config.grid.get(p.name, p.grid)
        if not values:
            axes.append([np.nan])
            continue
        bad = [v for v in values if not p.lo <= v <= p.hi]
        if bad:
            raise CptError(f"grid values {bad} for {p.name} lie outside its bounds [{p.lo:g}, {p.hi:g}]")
        axes.append([np.log(v) if p.log else v for v in values])
    points = np.array(list(itertools.product(*axes)), dtype=float)
    if len(points) > 200_000:
        raise CptError(f"the start grid has {len(points):,} points; give fewer values per parameter with --grid")
    return points


def _solve_linear(problem: _Problem, points: np.ndarray) -> np.ndarray:
    """Fill each start's linear coefficients by bounded least squares (weights ``1/obs`` for log residuals)."""
    form = problem.form
    lin = [i for i, p in enumerate(form.params) if p.linear]
    if not lin:
        return points
    z = points.copy()
    values = problem.values(np.nan_to_num(z))
    for i in lin:
        values[:, i] = 0.0
    params = {p.name: values[:, [i]] for i, p in enumerate(form.params)}
    with np.errstate(all="ignore"):
        offset = form.fn(problem.inputs, **params)
        basis = []
        for i in lin:
            params[form.params[i].name] = np.ones((len(z), 1))
            basis.append(form.fn(problem.inputs, **params) - offset)
            params[form.params[i].name] = np.zeros((len(z), 1))
    B = np.stack(basis, axis=1)  # (k, m, n)
    w = 1.0 / problem.y if form.residual == "log" else np.ones_like(problem.y)
    Bw, tw = B * w, (problem.y - offset) * w
    lo = np.array([form.params[i].lo for i in lin])
    hi = np.array([form.params[i].hi for i in lin])
    for k in range(len(z)):
        if not (np.all(np.isfinite(Bw[k])) and np.all(np.isfinite(tw[k]))):
            z[k, lin] = np.nan
            continue
        c = lsq_linear(Bw[k].T, tw[k], bounds=(lo, hi), method="bvls").x
        z[k, lin] = [np.log(max(ci, form.params[i].lo)) if form.params[i].log else ci for i, ci in zip(lin, c)]
    return z


def _on_bound(problem: _Problem, z: np.ndarray, tol: float) -> list[dict]:
    out = []
    for i, p in enumerate(problem.form.params):
        width = problem.hi[i] - problem.lo[i]
        for side, edge, limit in (("lower", problem.lo[i], p.lo), ("upper", problem.hi[i], p.hi)):
            if abs(z[i] - edge) <= tol * width:
                out.append({"param": p.name, "value": float(problem.values(z[None])[0, i]), "bound": side,
                            "limit": limit})
    return out


def describe_bounds(on_bound: list[dict]) -> str:
    """``"C on its lower bound (1e-10)"``-style text, or ``""``."""
    return "; ".join(f"{b['param']} on its {b['bound']} bound ({b['limit']:g})" for b in on_bound)


def fit(form: Form, inputs: Inputs, y: np.ndarray, config: FitConfig | None = None) -> FitResult:
    """Fit ``form`` to observations ``y`` at ``inputs``; see the module docstring for the method.

    Raises:
        CptError: too few points for the parameters, non-finite or (for log residuals) non-positive
            observations, or no L-BFGS-B start converged.
    """
    config = config or FitConfig()
    y = np.asarray(y, dtype=float)
    inputs = {k: np.asarray(inputs[k], dtype=float) for k in form.inputs}
    P = len(form.params)
    if len(y) < P:
        raise CptError(f"{form.name} ({form.formula}) has {P} parameters but only {len(y)} data points")
    if not np.all(np.isfinite(y)) or (form.residual == "log" and np.any(y <= 0)):
        raise CptError(f"{form.name}: observations must be finite{' and > 0' if form.residual == 'log' else ''}")
    problem = _Problem(form, inputs, y, config.huber_delta)
    points = _solve_linear(problem, _grid_points(form, config))
    points = np.clip(points, problem.lo, problem.hi)
    objective = np.full(len(points), np.inf)
    ok = np.all(np.isfinite(points), axis=1)
    if ok.any():
        objective[ok] = problem.objective(points[ok])
    order = [i for i in np.argsort(objective, kind="stable") if np.isfinite(objective[i])]
    if not order:
        raise CptError(f"{form.name}: the law is not finite at any start point; check the data's ranges "
                       "(e.g. D > 0, 0 < r <= 1)")
    order = order[: config.starts] if config.starts else order
    # One BLAS thread: the optimisers' BLAS calls are on vectors of ~10 numbers, and a multithreaded OpenBLAS
    # spends milliseconds per call waking its threads (13x slower on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        screened = [problem.minimise(points[i], config.method, min(config.screen_iter, config.max_iter))
                    for i in order]
        done = [(z, f) for z, f, ok, _ in screened if ok]
        # Only starts still below every converged one are worth their remaining iterations.
        best_done = min((f for _, f in done), default=np.inf)
        going = sorted((r for r in screened if not r[2] and r[1] < best_done), key=lambda r: r[1])
        last = going[0][3] if going else ""
        if config.max_iter > config.screen_iter:
            for z, _, _, _ in going[: config.finalists]:
                z, f, ok, last = problem.minimise(z, config.method, config.max_iter - config.screen_iter)
                if ok:
                    done.append((z, f))
        converged = len(done)
        best, best_f = min(done, key=lambda r: r[1]) if done else (None, np.inf)
        if best is not None and config.polish and config.method == "lbfgsb":
            # L-BFGS-B stops on its tolerances partway along the flat valleys (the D-CPT Law's E, C, gamma, eps),
            # short of the optimum; Gauss-Newton from there reaches it in a few steps. Kept only if lower.
            z, f, ok, _ = problem.minimise(best, "trf", config.max_iter)
            if ok and f < best_f:
                best = z
    if best is None:
        name = {"lbfgsb": "L-BFGS-B", "trf": "least_squares (trf)"}[config.method]
        raise CptError(f"{form.name}: {name} did not converge from any of {len(order)} starts within "
                       f"{config.max_iter} iterations (last: {last}); raise --max-iter or --starts, widen "
                       "--grid, or check the table")
    pred = problem.predict(best)[0]
    values = problem.values(best[None])[0]
    r2, rmse = r2_rmse(pred, y)
    return FitResult(form, {p.name: float(v) for p, v in zip(form.params, values)},
                     float(huber(problem.residuals(pred), config.huber_delta).mean()), r2, rmse, True,
                     _on_bound(problem, best, config.bound_tol), len(y), len(order), converged)


@dataclass
class CvResult:
    """Grouped k-fold cross-validation: every group value (a ratio, size or token count) is held out once."""

    key: str
    folds: int
    r2: float
    rmse: float
    per_fold: list[dict]

    def to_dict(self) -> dict:
        return {"key": self.key, "folds": self.folds, "r2": self.r2, "rmse": self.rmse, "per_fold": self.per_fold}


def cross_validate(form: Form, inputs: Inputs, y: np.ndarray, groups: np.ndarray, key: str, folds: int,
                   config: FitConfig | None = None, check: Callable[[np.ndarray], None] | None = None) -> CvResult:
    """Fit on all groups but one fold's, predict the held-out fold; R² and RMSE pool every held-out prediction.

    Distinct group values are sorted and dealt to folds in turn (value ``i`` to fold ``i % folds``), so each fold
    holds out values from across the range, ends included: extrapolation is part of what is measured.

    Args:
        groups: the grouping column (one value per row), e.g. the ratio of each row.
        key: its name, for messages and the result.
        folds: how many folds; at most the number of distinct group values.
        check: called with each training mask; raises ``CptError`` when a fold leaves too little to fit.

    Raises:
        CptError: fewer than 2 folds or more folds than distinct values, a fold that ``check`` rejects, or a
            fold's fit failing.
    """
    values = np.unique(groups)
    if folds < 2 or folds > len(values):
        raise CptError(f"cross-validation by {key} needs 2 <= folds <= the {len(values)} distinct {key} values, "
                       f"got --folds {folds}")
    y = np.asarray(y, dtype=float)
    pred = np.full(len(y), np.nan)
    per_fold = []
    for k in range(folds):
        held = values[k::folds]
        test = np.isin(groups, held)
        where = f"cross-validation by {key}, fold {k + 1}/{folds} (holding out {key} = " \
                f"{', '.join(f'{v:g}' for v in held)})"
        try:
            if check is not None:
                check(~test)
            result = fit(form, {n: v[~test] for n, v in inputs.items()}, y[~test], config)
        except CptError as e:
            raise CptError(f"{where}: {e}") from None
        pred[test] = result.predict({n: v[test] for n, v in inputs.items()})
        r2, rmse = r2_rmse(pred[test], y[test])
        per_fold.append({"held_out": [float(v) for v in held], "n": int(test.sum()), "r2": r2, "rmse": rmse})
    r2, rmse = r2_rmse(pred, y)
    return CvResult(key, folds, r2, rmse, per_fold)
