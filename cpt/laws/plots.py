"""Plots of fitted laws: observed points against fitted curves per model size and ratio, and predicted loss
surfaces over ratio x tokens. Agg canvas only, as :mod:`cpt.plots`, so it runs headless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator

from cpt.laws.cmr import CmrFit
from cpt.laws.dcpt import DcptFit
from cpt.laws.mixing import SizeMix
from cpt.laws.table import Table

RATIO_COLORS = colormaps["viridis"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _ratio_colorbar(fig: Figure, axes, ratios: np.ndarray) -> Normalize:
    norm = Normalize(min(ratios.min(), 0.0), 1.0)
    bar = fig.colorbar(_mappable(norm), ax=axes, shrink=0.8, pad=0.01)
    bar.set_label("domain share r")
    return norm


def _mappable(norm: Normalize):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=RATIO_COLORS)


def plot_dcpt(table: Table, fit: DcptFit, path: Path, domain: str | None = None) -> Path:
    """Loss against CPT tokens: one column per model size, a row each for the general and the domain loss;
    observed points and fitted curves coloured by the domain share. ``domain`` names the domain of ``table``'s
    rows for a cross-domain fit."""
    rows = table.cpt_rows()
    sizes = np.unique(rows.N)
    ratios = np.unique(rows.r)
    fig = _figure(3.6 * len(sizes) + 1.2, 6.4)
    axes = fig.subplots(2, len(sizes), squeeze=False, sharex=True)
    norm = _ratio_colorbar(fig, axes, ratios)
    D = np.geomspace(rows.D.min(), rows.D.max(), 200)
    for i, loss in enumerate(("general", "domain")):
        result = getattr(fit, loss)
        for j, n in enumerate(sizes):
            ax = axes[i][j]
            for r in ratios:
                at = rows.subset((rows.N == n) & (rows.r == r))
                color = RATIO_COLORS(norm(r))
                if len(at):
                    ax.scatter(at.D, getattr(at, f"{loss}_loss"), s=14, color=color, zorder=3)
                curve = fit.general_loss(n, D, r) if loss == "general" else fit.domain_loss(n, D, r, domain)
                ax.plot(D, curve, color=color, linewidth=1.3)
            before = fit.pre_cpt["general"].get(float(n)) if loss == "general" else None
            if before is not None:  # what usage 1's tolerance is relative to
                ax.axhline(before, color="0.4", linestyle=":", linewidth=1.2)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(numticks=5))
            ax.grid(True, alpha=0.3)
            if i == 0:
                ax.set_title(f"N = {n:.3g}")
            if i == 1:
                ax.set_xlabel("CPT tokens D")
            if j == 0:
                ax.set_ylabel(f"{loss} loss (R² {result.r2:.3f})")
    fig.suptitle(f"D-CPT Law{f' ({domain})' if domain else ''}: observed (points) vs fitted (lines)\nthe general "
                 "law sees the general share 1 - r; dotted: general loss before CPT", fontsize=10)
    return _save(fig, path)


def plot_dcpt_surface(fit: DcptFit, N: float, path: Path) -> Path:
    """Predicted general and domain loss over domain share x CPT tokens at model size ``N``, with contours."""
    lo, hi = fit.ranges["D"]
    D = np.geomspace(lo, hi * 10, 120)
    r = np.linspace(0.01, 1.0, 120)
    RR, DD = np.meshgrid(r, D)
    fig = _figure(11, 4.6)
    for ax, loss in zip(fig.subplots(1, 2), ("general", "domain")):
        Z = fit.general_loss(N, DD, RR) if loss == "general" else fit.domain_loss(N, DD, RR)
        mesh = ax.pcolormesh(RR, DD, Z, shading="auto", cmap="magma_r")
        contours = ax.contour(RR, DD, Z, levels=8, colors="white", linewidths=0.7)
        ax.clabel(contours, fmt="%.3g", fontsize=7)
        ax.axhline(hi, color="0.3", linestyle="--", linewidth=1)
        ax.text(0.03, hi * 1.15, "largest fitted D", color="0.1", va="bottom", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
        ax.set_yscale("log")
        ax.set_xlabel("domain share r")
        ax.set_ylabel("CPT tokens D")
        ax.set_title(f"predicted {loss} loss")
        fig.colorbar(mesh, ax=ax, label="loss (nats/token)")
    fig.suptitle(f"D-CPT Law surface at N = {N:.3g}", fontsize=11)
    return _save(fig, path)


def plot_cmr(table: Table, cmr: CmrFit, path: Path) -> Path:
    """Per model size: the general and domain loss changes against T per ratio (points and fitted curves), and
    the direct CMR estimates with the fitted CMR law."""
    sizes = list(cmr.sizes)
    fig = _figure(14, 3.6 * len(sizes) + 0.6)
    axes = fig.subplots(len(sizes), 3, squeeze=False)
    ratios = np.unique(table.r)
    norm = _ratio_colorbar(fig, axes[:, :2], ratios)
    for i, n in enumerate(sizes):
        curves = cmr.sizes[n]
        rows = table.subset((table.N == n) & (table.D > 0))
        T = np.geomspace(min(curves.T), max(curves.T), 200)
        for ax, loss, base in ((axes[i][0], "general", curves.general0), (axes[i][1], "domain", curves.domain0)):
            for r, result in getattr(curves, loss).items():
                color = RATIO_COLORS(norm(r))
                at = rows.subset(rows.r == r)
                ax.scatter(at.D / cmr.t_unit, getattr(at, f"{loss}_loss") - base, s=14, color=color, zorder=3)
                ax.plot(T, result.predict({"T": T}), color=color, linewidth=1.3)
            ax.axhline(0, color="0.4", linewidth=0.8)
            if loss == "general":
                ax.axhline(cmr.epsilon, color="C3", linestyle="--", linewidth=1, label=f"epsilon {cmr.epsilon:g}")
                ax.legend(loc="upper left", frameon=False, fontsize=8)
            ax.set_xscale("log")
            ax.set_ylabel(f"{loss} loss change")
            ax.set_title(f"N = {n:.3g}: {loss} loss change")
        ax = axes[i][2]
        est = cmr.estimates[n]
        ax.scatter([e["T"] for e in est], [e["ratio"] for e in est], color="C0", zorder=3, label="direct estimate")
        if cmr.laws[n] is not None:
            ax.plot(T, cmr.laws[n].predict({"T": T}), color="C1", label="R_CMR(T) = a4 T^s4 + b3")
        else:
            ax.text(0.5, 0.5, cmr.notes.get(n, "no law"), transform=ax.transAxes, ha="center", wrap=True, fontsize=8)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("critical domain ratio")
        ax.set_title(f"N = {n:.3g}: CMR, epsilon {cmr.epsilon:g}")
        ax.legend(loc="best", frameon=False, fontsize=8)
        for a in axes[i]:
            a.grid(True, alpha=0.3)
            a.set_xlabel(f"T (tokens / {cmr.t_unit:.3g})")
    return _save(fig, path)


def plot_mixing(table: Table, mix: dict[float, SizeMix], path: Path) -> Path:
    """Per model size: the general and the domain loss against the domain share, observed and fitted."""
    sizes = list(mix)
    fig = _figure(4.2 * len(sizes) + 0.4, 3.8)
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    r = np.linspace(0.0, 1.0, 200)
    for ax, n in zip(axes, sizes):
        m = mix[n]
        rows = table.subset((table.N == n) & (table.D == m.D))
        for loss, color in (("general", "C0"), ("domain", "C1")):
            result = getattr(m, loss)
            ax.scatter(rows.r, getattr(rows, f"{loss}_loss"), color=color, s=18, zorder=3)
            ax.plot(r, result.predict({"r": r}), color=color, label=f"{loss} (R² {result.r2:.3f})")
        if m.general0 is not None:
            ax.axhline(m.general0, color="C0", linestyle=":", linewidth=1, label="general, before CPT")
        ax.set_title(f"N = {n:.3g}, D = {m.D:.3g}")
        ax.set_xlabel("domain share r")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle("Data Mixing Law L = c + k exp(t r): observed (points) vs fitted (lines)", fontsize=10)
    return _save(fig, path)

