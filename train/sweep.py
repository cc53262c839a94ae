"""Grid of runs (methods x sparsities x seeds) of one config, summarised as a markdown table.

``python -m train.sweep --config mnist_mlp --methods dense rigl srigl_noablation srigl --sparsities 0.9 0.95 0.99
--seeds 0 1 --out runs/mnist_sweep`` runs each combination in this process (dense once per seed), skips
runs whose summary.json already exists (so an interrupted sweep resumes), and writes results.md/.json.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from train.configs import METHODS, ConfigError, get_config, parse_field
from train.report import format_table


def run_dir(out: Path, method: str, sparsity: float, seed: int) -> Path:
    """The workdir of one grid cell (dense runs have sparsity 0)."""
    return out / f"{method}-{sparsity:g}-s{seed}"


def _cells(methods, sparsities, seeds):
    for method in methods:
        for sparsity in ([0.0] if method == "dense" else sparsities):
            for seed in seeds:
                yield method, sparsity, seed


def run_grid(config: str, methods: list[str], sparsities: list[float], seeds: list[int], out: Path,
             **overrides) -> list[dict]:
    """Train every (method, sparsity, seed) not yet done under ``out``; return all summaries."""
    from train.loop import train

    for method, sparsity, seed in _cells(methods, sparsities, seeds):
        workdir = run_dir(out, method, sparsity, seed)
        done = workdir / "summary.json"
        if not done.is_file():
            cfg = get_config(config, method=method, sparsity=sparsity, seed=seed, workdir=str(workdir),
                             progress=False, **overrides)
            print(f"== {method} S={sparsity:g} seed={seed}", flush=True)
            result = train(cfg)
            if result.status == "interrupted":  # checkpointed; re-running the sweep resumes this run
                print(f"interrupted at step {result.summary['steps']} of {workdir}; run the same sweep "
                      f"command to resume.", flush=True)
                raise SystemExit(128 + result.signal)
        summary = json.loads(done.read_text())
        print(f"   test acc {summary['test_accuracy']:.4f}  active neurons "
              f"{summary['active_neuron_fraction']:.3f}  ({summary['train_seconds']} s)", flush=True)
    return summaries_under(out, methods, sparsities, seeds)


def summaries_under(out: Path, methods, sparsities, seeds) -> list[dict]:
    """The summaries of the grid's finished runs under ``out`` (unfinished or missing runs are left out)."""
    paths = [run_dir(out, *cell) / "summary.json" for cell in _cells(methods, sparsities, seeds)]
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def results_table(summaries: list[dict]) -> str:
    """Markdown table: mean +- std over seeds of test accuracy and active-neuron fraction."""
    groups = defaultdict(list)
    for s in summaries:
        groups[(s["method"], s["sparsity"])].append(s)
    rows = [("method", "sparsity", "seeds", "test acc % (mean +- std)", "active neurons % (mean +- std)",
             "ITOP %")]
    for (method, sparsity), runs in groups.items():
        acc = np.array([r["test_accuracy"] for r in runs]) * 100
        act = np.array([r["active_neuron_fraction"] for r in runs]) * 100
        itop = np.array([r["itop_rate"] for r in runs]) * 100
        rows.append((method, f"{sparsity:g}", len(runs), f"{acc.mean():.2f} +- {acc.std(ddof=1) if len(runs) > 1 else 0:.2f}",
                     f"{act.mean():.1f} +- {act.std(ddof=1) if len(runs) > 1 else 0:.1f}", f"{itop.mean():.1f}"))
    text = format_table(rows).splitlines()
    md = ["| " + " | ".join(c.strip() for c in _split(line, rows)) + " |" for line in [text[0]] + text[2:]]
    md.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(md)


def _split(line: str, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    cells, pos = [], 0
    for w in widths:
        cells.append(line[pos:pos + w])
        pos += w + 2
    return cells


_KEEP = object()  # not a string: argparse converts string defaults through `type`, which would refuse "keep"


def _gamma(text: str):
    try:
        return parse_field("gamma_sal", text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__)
    p.add_argument("--config", default="mnist_mlp")
    p.add_argument("--methods", nargs="+", default=["dense", "rigl", "srigl_noablation", "srigl"], choices=METHODS)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--gamma-sal", type=_gamma, default=_KEEP,
                   help="override gamma_sal (SRigL ablation threshold; none: no ablation; default: the config's)")
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    out = Path(args.out)
    overrides = {} if args.steps is None else {"steps": args.steps}
    if args.gamma_sal is not _KEEP:
        overrides["gamma_sal"] = args.gamma_sal
    from train.testing import persistent_compile_cache
    with persistent_compile_cache(out / "jax_cache"):  # seeds of one setting share the compiled step
        summaries = run_grid(args.config, args.methods, args.sparsities, args.seeds, out, **overrides)
    table = results_table(summaries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(summaries, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
