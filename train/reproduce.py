"""The paper's comparisons, reproduced at a scale a 2-core CPU can run, with one resumable command each.

``python -m train.reproduce cifar10`` trains the grid of the README's "Evidence on CIFAR-10" (ResNet-18 at width
16, 2000 steps; dense, RigL, SRigL without ablation and SRigL with ablation at 90/95/99%, a second seed at 99%)
and writes ``bench/results/cifar10_reproduction.{json,png,md}`` next to the paper's numbers.
``python -m train.reproduce mnist-gap`` runs the study of the MNIST 99% gap between RigL and SRigL
(``bench/results/mnist_gap.{json,png,md}``).

Every run is a :func:`train.sweep.run_grid` cell with its own workdir under ``--out``: a finished run is read back,
an interrupted one resumes from its checkpoint, so the command can be stopped and re-run at any time. Stages run
in order of how much they tell (the 99% cells first); ``--report-only`` writes the report from what is done.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from train.configs import get_config

# CIFAR-10 test accuracy (%) in the paper (Lasby et al., ICLR 2024, Table 1): sparsity -> method -> accuracy.
PAPER_CIFAR10: dict[str, dict[float, dict[str, float]]] = {
    "ResNet-18": {
        0.0: {"dense": 95.5},
        0.8: {"rigl": 95.2, "srigl_noablation": 95.2, "srigl": 95.2},
        0.9: {"rigl": 95.1, "srigl_noablation": 95.0, "srigl": 95.1},
        0.95: {"rigl": 94.6, "srigl_noablation": 94.5, "srigl": 94.7},
        0.99: {"rigl": 92.9, "srigl_noablation": 91.5, "srigl": 92.8},
    },
    "WRN-22-2": {
        0.0: {"dense": 95.0},
        0.9: {"rigl": 93.3, "srigl_noablation": 93.1, "srigl": 93.3},
        0.95: {"rigl": 92.1, "srigl_noablation": 91.4, "srigl": 91.8},
        0.99: {"rigl": 84.9, "srigl_noablation": 76.9, "srigl": 82.7},
    },
}

METHOD_LABELS = {"dense": "dense", "rigl": "RigL", "srigl_noablation": "SRigL w/o ablation", "srigl": "SRigL",
                 "static": "static", "set": "SET"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """Runs of one setting: ``methods`` x ``sparsities`` x ``seeds`` of ``config`` with ``overrides``, under
    ``out/subdir`` (settings that differ only in overrides need their own subdir: the run folders are named by
    method, sparsity and seed). ``label`` names the setting in the report (default: the method's name);
    ``when`` decides from the summaries done so far whether the stage is needed at all."""

    methods: tuple[str, ...]
    sparsities: tuple[float, ...] = (0.0,)
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    subdir: str = ""
    label: str = ""
    when: Callable[[list[dict]], bool] | None = None

    def cell_label(self, method: str) -> str:
        return self.label or METHOD_LABELS.get(method, method)


@dataclasses.dataclass(frozen=True)
class Study:
    """A named list of stages over one config, and where its report goes."""

    name: str
    config: str
    stages: tuple[Stage, ...]
    description: str


# Below this fraction of neurons ablated, gamma_sal 0.3 has not really changed the method: at 99% ERK gives most
# layers here k0 = 4-6, so theta = max(1, floor(0.3 k0)) = 1 and a neuron goes only when none of its weights is
# salient (2 of 1200 neurons in the first SRigL run).
NEGLIGIBLE_ABLATION = 0.01


def _srigl_ablated_nothing(summaries: list[dict]) -> bool:
    """True when every SRigL run (gamma_sal 0.3) done so far ablated less than ``NEGLIGIBLE_ABLATION`` of its
    neurons: the paper's threshold does not ablate on this model, so the study adds the value that does."""
    srigl = [s for s in summaries if s["method"] == "srigl" and s["label"] == METHOD_LABELS["srigl"]]
    return bool(srigl) and all(s["active_neuron_fraction"] > 1.0 - NEGLIGIBLE_ABLATION for s in srigl)


_SPARSE = ("rigl", "srigl_noablation", "srigl")
_GAMMA_095 = {"gamma_sal": 0.95}

CIFAR10 = Study(
    name="cifar10_reproduction",
    config="cifar10_resnet18_w16",
    description="CIFAR-10 (JPEG q75), ResNet-18 at width 16, 2000 steps (5.1 epochs), ERK, cosine lr",
    stages=(
        Stage(("dense",)),
        Stage(_SPARSE, (0.99,)),
        # Each gamma_sal 0.95 stage right after the gamma_sal 0.3 runs it is compared with (99% first: that is
        # where the paper's differences are), so an interrupted grid has the informative cells first.
        Stage(("srigl",), (0.99,), overrides=_GAMMA_095, subdir="gamma0.95", label="SRigL gamma_sal 0.95",
              when=_srigl_ablated_nothing),
        Stage(_SPARSE, (0.99,), seeds=(1,)),
        Stage(("srigl",), (0.99,), seeds=(1,), overrides=_GAMMA_095, subdir="gamma0.95",
              label="SRigL gamma_sal 0.95", when=_srigl_ablated_nothing),
        Stage(_SPARSE, (0.9, 0.95)),
        Stage(("srigl",), (0.9, 0.95), overrides=_GAMMA_095, subdir="gamma0.95", label="SRigL gamma_sal 0.95",
              when=_srigl_ablated_nothing),
        Stage(("dense",), seeds=(1,)),
    ),
)

_GAP = dict(sparsities=(0.99,), seeds=(0, 1))
MNIST_GAP = Study(
    name="mnist_gap",
    config="mnist_mlp",
    description="MNIST, LeNet-300-100 at 99%, ERK, 1500 steps unless the label says otherwise",
    stages=(
        Stage(("rigl", "srigl_noablation"), **_GAP, overrides={"steps": 1500}),
        # The ablation threshold relative to k0 (6 in fc1 and fc2 here): gamma_sal -> max(1, floor(gamma_sal * k0))
        # salient weights, i.e. 3, 4 and 5; gamma_sal >= 1 is an absolute count (6: all of k0 must be salient).
        *(Stage(("srigl",), **_GAP, overrides={"steps": 1500, "gamma_sal": g}, subdir=f"gamma{g:g}",
                label=f"SRigL gamma_sal {g:g}") for g in (0.5, 0.7, 0.95, 6)),
        # The structure alone, without dynamics: constant fan-in vs unstructured random masks, never updated.
        Stage(("static",), **_GAP, overrides={"steps": 1500}, label="static unstructured"),
        Stage(("srigl_noablation",), **_GAP, overrides={"steps": 1500, "delta_t": 1500}, subdir="static_fanin",
              label="static constant fan-in"),
        # Uniform instead of ERK: the first layer gets 99% too instead of ERK's 99.25%.
        Stage(("rigl", "srigl_noablation"), **_GAP, overrides={"steps": 1500, "distribution": "uniform"},
              subdir="uniform", label="{method} uniform"),
        # Training length: 4x longer (12.8 epochs).
        Stage(("rigl", "srigl_noablation"), **_GAP, overrides={"steps": 6000}, subdir="steps6000",
              label="{method}, 6000 steps"),
        Stage(("srigl",), **_GAP, overrides={"steps": 6000, "gamma_sal": 0.95}, subdir="steps6000",
              label="SRigL gamma_sal 0.95, 6000 steps"),
        Stage(("srigl",), **_GAP, overrides={"steps": 6000, "gamma_sal": 6}, subdir="steps6000_gamma6",
              label="SRigL gamma_sal 6, 6000 steps"),
    ),
)

STUDIES = {"cifar10": CIFAR10, "mnist-gap": MNIST_GAP}


def _label(stage: Stage, method: str) -> str:
    label = stage.cell_label(method)
    return label.format(method=METHOD_LABELS.get(method, method))


def run_study(study: Study, out: Path, *, report_only: bool = False, methods: Sequence[str] | None = None,
              sparsities: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
              **overrides: Any) -> list[dict]:
    """Train every stage of ``study`` not yet done under ``out`` (restricted to ``methods`` / ``sparsities`` /
    ``seeds`` when given; ``overrides`` apply to every run, e.g. ``steps`` for a miniature) and return the
    summaries of all finished runs, each with ``label`` and ``gamma_sal`` added. With ``report_only`` nothing
    is trained."""
    from train.sweep import run_grid, summaries_under

    done: list[dict] = []
    for stage in study.stages:
        keep = lambda xs, allowed: tuple(x for x in xs if allowed is None or x in allowed)  # noqa: E731
        stage_methods = keep(stage.methods, methods)
        stage_sparsities = stage.sparsities if stage.methods == ("dense",) else keep(stage.sparsities, sparsities)
        stage_seeds = keep(stage.seeds, seeds)
        if not (stage_methods and stage_sparsities and stage_seeds):
            continue
        where = out / stage.subdir if stage.subdir else out
        if not report_only and (stage.when is None or stage.when(done)):
            run_grid(study.config, list(stage_methods), list(stage_sparsities), list(stage_seeds), where,
                     **{**stage.overrides, **overrides})
        for method in stage_methods:
            for s in summaries_under(where, [method], stage_sparsities, stage_seeds):
                done.append({**s, "label": _label(stage, method), "stage_overrides": stage.overrides})
    return done


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def cells(summaries: list[dict]) -> list[dict]:
    """One record per (label, sparsity): per-seed values, mean and spread, fan-in per layer at the end."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for s in summaries:
        groups[(s["label"], s["sparsity"])].append(s)
    out = []
    for (label, sparsity), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        acc = [100 * r["test_accuracy"] for r in runs]
        mean, std = _mean_std(acc)
        out.append({
            "label": label, "method": runs[0]["method"], "sparsity": sparsity, "seeds": [r["seed"] for r in runs],
            "overrides": runs[0]["stage_overrides"],
            "test_accuracy": acc, "test_accuracy_mean": mean, "test_accuracy_std": std,
            "active_neuron_fraction": [r["active_neuron_fraction"] for r in runs],
            "itop_rate": [r["itop_rate"] for r in runs],
            "train_seconds": [r["train_seconds"] for r in runs],
            # fan-in k' per sparse layer at the end of the first seed's run: (min, max) over active neurons
            "fan_in": {path: [st["fan_in_min"], st["fan_in"], st["active_neurons"], st["n_neurons"]]
                       for path, st in runs[0]["layers"].items() if not st["dense"]},
        })
    return out


def paper_numbers(method: str, sparsity: float) -> dict[str, float]:
    """The paper's CIFAR-10 accuracy for this method and sparsity, per model (only where the paper has it)."""
    return {model: table[sparsity][method] for model, table in PAPER_CIFAR10.items()
            if method in table.get(sparsity, {})}


def markdown_table(study: Study, cell_list: list[dict]) -> str:
    """README-ready table: our mean +- std per cell, active neurons, ITOP, fan-in k' range of the sparse layers,
    and (CIFAR-10) the paper's full-scale numbers."""
    with_paper = study is CIFAR10
    head = ["method", "S", "seeds", "test acc %", "active neurons %", "ITOP %", "fan-in k' (min-max over layers)"]
    if with_paper:
        head += [f"paper {m}" for m in PAPER_CIFAR10]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(cell_list, key=lambda c: (c["sparsity"], _order(c))):
        act = 100 * np.asarray(c["active_neuron_fraction"])
        ks = [k for lo_hi in c["fan_in"].values() for k in lo_hi[:2]]
        row = [c["label"], f"{c['sparsity']:g}", str(len(c["seeds"])),
               f"{c['test_accuracy_mean']:.2f} +- {c['test_accuracy_std']:.2f}",
               f"{act.mean():.1f}" + (f" ({act.min():.1f}-{act.max():.1f})" if len(act) > 1 else ""),
               f"{100 * np.mean(c['itop_rate']):.1f}" if c["sparsity"] else "-",
               f"{min(ks)}-{max(ks)}" if ks else "-"]
        if with_paper:
            paper = paper_numbers(c["method"], c["sparsity"]) if not c["overrides"].get("gamma_sal") else {}
            row += [f"{paper[m]:.1f}" if m in paper else "" for m in PAPER_CIFAR10]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def _order(c: dict) -> int:
    return list(METHOD_LABELS).index(c["method"]) if c["method"] in METHOD_LABELS else 99


def plot_study(study: Study, cell_list: list[dict], path: Path) -> Path:
    """PNG: test accuracy per setting and sparsity (mean, seeds as points; the paper's numbers beside it for
    CIFAR-10), active-neuron fraction, and fan-in k' per layer at the highest sparsity (RigL's spread vs
    SRigL's constant). Settings are grouped by sparsity; a study at one sparsity gets one row per setting."""
    from matplotlib.figure import Figure

    sparse = [c for c in cell_list if c["sparsity"] > 0]
    sparsities = sorted({c["sparsity"] for c in sparse})
    labels = sorted({c["label"] for c in sparse},
                    key=lambda lab: (min(_order(c) for c in sparse if c["label"] == lab), lab))
    rows = len(sparsities) == 1  # one sparsity: horizontal bars, one labelled row per setting
    fig = Figure(figsize=(16, max(4.6, 0.32 * len(labels) + 1.5) if rows else 4.6))
    ax_acc, ax_act, ax_fan = fig.subplots(1, 3)
    width = 0.8 / max(1, len(labels))
    pos = {(label, s): (len(labels) - 1 - i if rows else j + (i - (len(labels) - 1) / 2) * width)
           for i, label in enumerate(labels) for j, s in enumerate(sparsities)}
    size = 0.8 if rows else width

    def bars(ax, cells_, values, **kw):
        at = [pos[c["label"], c["sparsity"]] for c in cells_]
        return (ax.barh(at, values, size, **kw) if rows else ax.bar(at, values, size, **kw)), at

    def points(ax, at, values, **kw):
        return ax.scatter(values, at, **kw) if rows else ax.scatter(at, values, **kw)

    for k, label in enumerate(labels):
        mine = [c for c in sparse if c["label"] == label]
        colour = f"C{k % 10}"
        _, at = bars(ax_acc, mine, [c["test_accuracy_mean"] for c in mine], color=colour, alpha=0.8, label=label)
        points(ax_acc, [a for a, c in zip(at, mine) for _ in c["test_accuracy"]],
               [v for c in mine for v in c["test_accuracy"]], s=10, color="k", zorder=3)
        bars(ax_act, mine, [100 * float(np.mean(c["active_neuron_fraction"])) for c in mine], color=colour,
             label=label)
    for c in cell_list:
        if c["sparsity"] == 0:
            line = ax_acc.axvline if rows else ax_acc.axhline
            line(c["test_accuracy_mean"], color="gray", ls="--", lw=1, label=f"{c['label']} (ours)")
    if study is CIFAR10:  # the paper's full-scale numbers on the bars of the same method (not the variants)
        for model, marker in zip(PAPER_CIFAR10, ("D", "v")):
            pts = [(pos[METHOD_LABELS[m], s], PAPER_CIFAR10[model][s][m]) for m in _SPARSE for s in sparsities
                   if (METHOD_LABELS[m], s) in pos and m in PAPER_CIFAR10[model].get(s, {})]
            if pts:
                points(ax_acc, *zip(*pts), marker=marker, s=22, facecolors="none", edgecolors="C3",
                       label=f"paper {model} (full scale)", zorder=4)
    all_acc = [a for c in cell_list for a in c["test_accuracy"]]
    acc_range = (max(0, math.floor(min(all_acc, default=0) - 5)), 100)
    for ax, what, lim in ((ax_acc, "test accuracy %", acc_range), (ax_act, "active neurons % (mean over seeds)",
                                                                      (0, 105))):
        if rows:
            ax.set(yticks=range(len(labels)), yticklabels=labels[::-1], xlabel=what, xlim=lim,
                   ylabel=f"S = {sparsities[0]:g}" if sparsities else "")
        else:
            ax.set(xticks=range(len(sparsities)), xticklabels=[f"{s:g}" for s in sparsities], xlabel="sparsity",
                   ylabel=what, ylim=lim)
            if ax is ax_acc and ax.get_legend_handles_labels()[0]:  # the colours mean the same in both panels
                ax.legend(fontsize=7, loc="best", framealpha=0.9)  # "best": over the fewest bars and markers
    ax_acc.set_title("test accuracy (bars: mean; dots: seeds)")
    ax_act.set_title("active neurons (colours as on the left)")
    if rows:
        ax_act.set(yticklabels=[])
        extra = [h for h in ax_acc.get_legend_handles_labels()[0] if not hasattr(h, "patches")]  # dense, paper
        if extra:
            ax_acc.legend(fontsize=7, loc="lower left", handles=extra)
    if sparsities:
        top = sparsities[-1]
        at_top = [c for c in sparse if c["sparsity"] == top]
        step = 0.8 / max(1, len(at_top))
        for i, c in enumerate(at_top):
            layers = list(c["fan_in"])
            ys = np.arange(len(layers)) + (i - (len(at_top) - 1) / 2) * step
            lo_k = [c["fan_in"][p][0] for p in layers]
            hi_k = [c["fan_in"][p][1] for p in layers]
            ax_fan.errorbar(lo_k, ys, xerr=[[0] * len(layers), np.subtract(hi_k, lo_k)], fmt="o", ms=3,
                            capsize=2, label=c["label"], color=f"C{labels.index(c['label']) % 10}")
            ax_fan.set(yticks=np.arange(len(layers)), yticklabels=[p.replace("/kernel", "") for p in layers])
        ax_fan.set(xscale="log", xlabel="fan-in k' (min to max over active neurons)",
                   title=f"fan-in per layer at the end, S={top:g}")
        ax_fan.tick_params(axis="y", labelsize=7)
        ax_fan.legend(fontsize=6, loc="best")
    fig.suptitle(study.description, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def machine() -> dict[str, str]:
    """The CPU the runs were timed on (bench/_machine.py when run from the repository, else platform's)."""
    try:
        from bench._machine import cpu_report
        return cpu_report()
    except ImportError:
        return {"processor": platform.processor() or platform.machine()}


def write_report(study: Study, summaries: list[dict], results: Path) -> dict:
    """``results``.json / .md / .png for the finished runs; returns the JSON record."""
    cell_list = cells(summaries)
    cfg = dataclasses.asdict(get_config(study.config))
    record = {"study": study.name, "description": study.description, "config": cfg, "machine": machine(),
              "cells": cell_list, "paper": {m: {str(s): v for s, v in t.items()} for m, t in PAPER_CIFAR10.items()}
              if study is CIFAR10 else None}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    results.with_suffix(".md").write_text(markdown_table(study, cell_list) + "\n")
    if cell_list:
        plot_study(study, cell_list, results.with_suffix(".png"))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=list(STUDIES))
    p.add_argument("--out", default=None, help="run folders (default runs/<study>)")
    p.add_argument("--results", default=None, help="report path without suffix (default bench/results/<study>)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs done; train nothing")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (a miniature)")
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help="only these sparsities")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    p.add_argument("--steps", type=int, default=None, help="override every run's length (a miniature)")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N examples (a miniature)")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    out = Path(args.out or f"runs/{study.name}")
    overrides = {k: v for k, v in (("steps", args.steps), ("train_subset", args.train_subset)) if v is not None}
    from train.testing import persistent_compile_cache
    with persistent_compile_cache(out / "jax_cache"):
        summaries = run_study(study, out, report_only=args.report_only, methods=args.methods,
                              sparsities=args.sparsities, seeds=args.seeds, **overrides)
    results = Path(args.results or f"bench/results/{study.name}")
    write_report(study, summaries, results)
    print(markdown_table(study, cells(summaries)))
    print(f"report: {results}.json / .md / .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
