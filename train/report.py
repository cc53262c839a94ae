"""Run outputs a person reads: the metrics JSONL file, the final summary tables and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _plain(value: Any) -> Any:
    """JSON-friendly scalar/array conversion (jax/numpy scalars -> Python numbers)."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricsLog:
    """Append-only JSONL log (one record per line). On resume, records after the restored step are dropped,
    so the file always describes exactly one consistent run."""

    def __init__(self, path: str | Path, resume_step: int | None):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


class NullLog:
    """The MetricsLog of processes other than 0 in a multi-process run: writes nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (missing file -> [])."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def layer_table(layer_stats: dict[str, dict[str, Any]]) -> str:
    """Per-layer table: shape, sparsity, active neurons, fan-in k' (min-max over active neurons)."""
    rows = [("layer", "shape", "sparsity", "active neurons", "fan-in k'")]
    for path, s in layer_stats.items():
        fan = str(s["fan_in"]) if s["fan_in_min"] == s["fan_in"] else f"{s['fan_in_min']}-{s['fan_in']}"
        rows.append((path, "x".join(map(str, s["shape"])), f"{max(s['sparsity'], 0.0) + 0.0:.4f}",
                     f"{s['active_neurons']}/{s['n_neurons']}", fan))
    return format_table(rows)


def format_table(rows: Iterable[Iterable[Any]]) -> str:
    """Plain-text table with aligned columns (first row = header)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_text(summary: dict[str, Any]) -> str:
    """Final summary: run-level numbers then the per-layer table."""
    keys = [("config", "config"), ("method", "method"), ("target sparsity", "sparsity"),
            ("steps", "steps"), ("test accuracy", "test_accuracy"), ("best test accuracy", "best_accuracy"),
            ("test loss", "test_loss"), ("global sparsity", "global_sparsity"),
            ("active neuron fraction", "active_neuron_fraction"), ("ITOP rate", "itop_rate"),
            ("train time (s, all sessions)", "train_seconds"), ("workdir", "workdir")]
    rows = [("metric", "value")]
    for label, k in keys:
        v = summary.get(k)
        rows.append((label, f"{v:.1f}" if k == "train_seconds" and isinstance(v, float) else
                     f"{v:.4f}" if isinstance(v, float) else v))
    out = format_table(rows)
    if summary.get("layers"):
        out += "\n\n" + layer_table(summary["layers"])
    return out


def plot_metrics(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """PNG: accuracy (train, test) and global sparsity / active-neuron fraction / ITOP over steps."""
    from matplotlib.figure import Figure  # no pyplot: never switches the backend of a notebook using us

    def series(key):
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        return tuple(zip(*pts)) if pts else ((), ())

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, label in (("train_accuracy", "train (batch)"), ("test_accuracy", "test")):
        x, y = series(key)
        if x:
            ax1.plot(x, y, marker="o" if key == "test_accuracy" else None, ms=3, label=label)
    ax1.set(xlabel="step", ylabel="accuracy", title="accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for key, label in (("global_sparsity", "global sparsity"), ("active_neuron_fraction", "active neurons"),
                       ("itop_rate", "ITOP rate")):
        x, y = series(key)
        if x:
            ax2.plot(x, y, label=label)
    ax2.set(xlabel="step", ylabel="fraction", title="sparsity / active neurons", ylim=(-0.02, 1.02))
    ax2.grid(alpha=0.3)
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
