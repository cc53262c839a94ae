"""Matplotlib helpers for the notebooks and reports. Every function returns the Figure and, given
``save_path``, also writes it as PNG. Selects the Agg backend unless one was already chosen
(MPLBACKEND set, as Jupyter kernels do, or pyplot already imported), so notebooks keep inline plots."""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import matplotlib

import sys  # noqa: E402

if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from srigl_jax import analysis  # noqa: E402

_KIND_LABELS = {"bernoulli": "Bernoulli", "constant_per_layer": "constant per layer",
                "constant_fan_in": "constant fan-in"}


def _finish(fig: plt.Figure, save_path: str | os.PathLike | None) -> plt.Figure:
    fig.tight_layout()
    if save_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
        fig.savefig(save_path, dpi=120)
    return fig


def show(fig: plt.Figure) -> None:
    """Display ``fig`` in a notebook and close it. Works whatever backend is active (another module may have
    switched to Agg), and closing keeps the inline backend from showing it a second time."""
    try:
        from IPython.display import Image, display
    except ImportError:  # plain Python: nothing to display to
        plt.close(fig)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # explicit PNG: independent of the backend's display hooks
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def plot_output_norm_variance(rows: Sequence[Mapping[str, Any]], save_path: str | None = None) -> plt.Figure:
    """Simulated Var[R] (points with 2-sigma bars) and closed forms (lines) vs fan-in, per mask kind;
    ``rows`` from ``analysis.output_norm_variance_table`` (one n_in, n_out and input distribution)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, kind in enumerate(analysis.MASK_KINDS):
        rs = sorted((r for r in rows if r["mask_kind"] == kind), key=lambda r: r["fan_in"])
        if not rs:
            continue
        k = np.array([r["fan_in"] for r in rs])
        color = f"C{i}"
        ax.errorbar(k, [r["simulated"] for r in rs], yerr=[2 * r["stderr"] for r in rs], fmt="o",
                    color=color, label=f"{_KIND_LABELS[kind]} (simulated)")
        ax.plot(k, [r["closed_form"] for r in rs], "-", color=color, alpha=0.7,
                label=f"{_KIND_LABELS[kind]} (closed form)")
    n = rows[0]["n_in"]
    m = rows[0]["n_out"]
    ax.axhline(5.0 / m, color="gray", ls=":", label="dense (5/m)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fan-in k")
    ax.set_ylabel("Var[ (n/m) ||z||^2 / ||x||^2 ]")
    ax.set_title(f"Output-norm variance, n={n}, m={m}")
    ax.legend(fontsize=7)
    return _finish(fig, save_path)


def plot_bernoulli_excess(n_in: int, fan_ins: Sequence[int], simulated: Sequence[float],
                          stderr: Sequence[float], save_path: str | None = None) -> plt.Figure:
    """Simulated Bernoulli excess Var_B - 5/n vs the two printed readings (18n/k and 18k/n)."""
    k = np.asarray(fan_ins, dtype=float)
    cand = [analysis.bernoulli_excess_candidates(n_in, int(kk)) for kk in k]
    exact = [analysis.output_norm_variance("bernoulli", n_in, int(kk)) - 5.0 / n_in for kk in k]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(k, simulated, yerr=2 * np.asarray(stderr), fmt="o", color="k", label="simulated")
    ax.plot(k, exact, "-", color="C0", label="exact: 18(n-k)/(n(n+2)k)")
    ax.plot(k, [c["18n/k"] for c in cand], "--", color="C2", label="(18/n^2) n/k")
    ax.plot(k, [c["18k/n"] for c in cand], "--", color="C3", label="(18/n^2) k/n")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fan-in k")
    ax.set_ylabel("Var_B - 5/n")
    ax.set_title(f"Bernoulli excess variance, n=m={n_in}")
    ax.legend(fontsize=8)
    return _finish(fig, save_path)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                title: str = "", save_path: str | None = None, ax: plt.Axes | None = None) -> plt.Figure:
    """Line plot of {label: (x, y)}; used for training histories (accuracy, k', active neurons, ITOP)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker="." if len(x) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _finish(fig, save_path)


def plot_history_grid(histories: Mapping[str, Mapping[str, Sequence[float]]], keys: Sequence[str],
                      x_key: str = "step", save_path: str | None = None) -> plt.Figure:
    """One panel per metric in ``keys``; one line per run in ``histories`` ({run: {metric: values}})."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, hist in histories.items():
            if key in hist and len(hist[key]):
                ax.plot(hist[x_key][: len(hist[key])], hist[key], label=label)
        ax.set_xlabel(x_key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _finish(fig, save_path)


def plot_fan_in_histograms(fan_ins: Mapping[str, np.ndarray], title: str = "", save_path: str | None = None
                           ) -> plt.Figure:
    """Overlaid histograms of per-neuron fan-in, one per label (e.g. RigL vs SRigL for one layer)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(int(np.max(f)) for f in fan_ins.values())
    bins = np.arange(-0.5, top + 1.5, max(1, (top + 1) // 40))
    for label, f in fan_ins.items():
        ax.hist(np.asarray(f), bins=bins, alpha=0.55, label=label)
    ax.set_xlabel("fan-in (active inputs per neuron)")
    ax.set_ylabel("neurons")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _finish(fig, save_path)


def plot_bars(values: Mapping[str, float], ylabel: str, title: str = "", errors: Mapping[str, float] | None = None,
              save_path: str | None = None) -> plt.Figure:
    """Bar chart of {label: value} (e.g. median latencies), optional error bars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(values)
    ax.bar(labels, [values[k] for k in labels],
           yerr=None if errors is None else [errors.get(k, 0.0) for k in labels], color=[f"C{i}" for i in range(len(labels))])
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, save_path)
