"""Analysis tools for sparse networks: output-norm variance (SRigL paper, Appendix A), FLOPs,
active neurons / fan-in statistics, and In-Time Over-Parameterisation (ITOP) curves.

Everything here is host-side analysis (numbers for tables and plots), except the Monte-Carlo
simulation, which runs jit-compiled and vmapped on explicit ``jax.random`` keys.

Output-norm variance model (our derivation; see ``output_norm_variance``)
-------------------------------------------------------------------------
One sparse ReLU layer with ``n`` inputs, ``m`` outputs and average fan-in ``k``:

* mask ``M`` in {0,1}^(n x m) (Flax layout: fan-in axis 0), drawn independently of everything else as
  - ``"bernoulli"``: every entry kept independently with probability ``p = k / n``;
  - ``"constant_per_layer"``: exactly ``k * m`` entries kept, placed uniformly at random in the layer;
  - ``"constant_fan_in"``: every neuron keeps exactly ``k`` of its ``n`` inputs, uniformly at random;
* weights ``W_ij ~ N(0, 2 / k)`` i.i.d. (He/Kaiming init for the *average* fan-in, the same for all three
  mask kinds, so only the mask distribution differs);
* input ``x`` with i.i.d. entries, either ``"gaussian"`` (N(0, 1)) or ``"sign"`` (uniform +-1), drawn
  fresh per trial; ``x`` is independent of ``W`` and ``M``;
* output ``z = ReLU((M * W)^T x)``; the statistic is the normalised norm ratio
  ``R = (n / m) * ||z||^2 / ||x||^2`` (the ``n / m`` makes ``E[R] = 1`` exactly for every mask kind).

Result (exact, finite n, m, k): with ``p = k / n`` and the input moments ``beta = E[u_i u_j]`` (i != j),
``gamma = E[u_i^2] - beta`` of ``u = x^2 / ||x||^2`` (gaussian: ``beta = 1/(n(n+2))``, ``gamma = 2/(n(n+2))``;
sign: ``beta = 1/n^2``, ``gamma = 0``)::

    Var_CF  = (n^2 / m) * (gamma * (6 - p) / k + 5 * beta)
    Var_B   = Var_CF + 6 * beta * n^2 * (1 - p) / (m * k)
    Var_CPL = Var_CF + n^2 * (1 - p) / (m * k) * (m - 1) / (n m - 1) * (5 * beta * n - gamma)

so constant fan-in has the smallest variance, then constant-per-layer, then Bernoulli, and the gap
grows as ``k`` shrinks. For Gaussian inputs and a square layer (m = n) with k << n::

    Var_CF ~ (5 + 12 / k) / n,     Var_B = 5 / n + 18 (n - k) / (n (n + 2) k) ~ 5 / n + (18 / n^2) * (n / k)

i.e. the Bernoulli excess over the dense value 5/n is ``18 n / k`` in units of ``1 / n^2``: it grows with
sparsity (``n / k``). **The paper prints both "18k/n" and "18n/k"; simulation (``simulate_output_norm_variance``,
tests/test_analysis.py, notebooks/paper_analysis.ipynb) agrees with the ``18 n / k`` form and rules out
``18 k / n``** (which would make the excess vanish as the layer becomes sparser).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.metrics import init_itop, itop_rate, update_itop
from srigl_jax.paths import path_str
from srigl_jax.plans import LayerPlan

MASK_KINDS = ("bernoulli", "constant_per_layer", "constant_fan_in")
INPUT_KINDS = ("gaussian", "sign")

# ----------------------------------------------------------------------------------------------
# (a) Appendix A: output-norm variance, closed forms and Monte-Carlo simulation
# ----------------------------------------------------------------------------------------------


def _check_layer(mask_kind: str, n_in: int, fan_in: int, n_out: int, input_dist: str) -> None:
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    if input_dist not in INPUT_KINDS:
        raise ValueError(f"input_dist must be one of {INPUT_KINDS}, got {input_dist!r}")
    for name, v in (("n_in", n_in), ("fan_in", fan_in), ("n_out", n_out)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if fan_in > n_in:
        raise ValueError(f"fan_in={fan_in} exceeds n_in={n_in}")


def _input_moments(n_in: int, input_dist: str) -> tuple[float, float]:
    """(beta, gamma): beta = E[u_i u_j] (i != j), gamma = E[u_i^2] - beta, for u = x^2 / ||x||^2.

    Gaussian x: u ~ Dirichlet(1/2, ..., 1/2), so E[u_i^2] = 3/(n(n+2)) and E[u_i u_j] = 1/(n(n+2)).
    Sign x: u_i = 1/n exactly.
    """
    n = float(n_in)
    if input_dist == "gaussian":
        return 1.0 / (n * (n + 2.0)), 2.0 / (n * (n + 2.0))
    return 1.0 / n**2, 0.0


def output_norm_variance(mask_kind: str, n_in: int, fan_in: int, n_out: int | None = None,
                         input_dist: str = "gaussian") -> float:
    """Exact Var[R] of the normalised output-norm ratio R = (n/m) ||ReLU((M*W)^T x)||^2 / ||x||^2.

    Assumptions (see module docstring): W_ij ~ N(0, 2/fan_in) i.i.d.; mask ``mask_kind`` with average
    fan-in ``fan_in``; x i.i.d. ``input_dist`` entries; ReLU; ``n_out`` defaults to ``n_in`` (square layer).

    Derivation: given M and x, z_i^2 = sigma^2 ||x||^2 a_i xi_i with a_i = sum_j M_ji u_j and
    xi_i = ReLU(g_i)^2 i.i.d. (E xi = 1/2, E xi^2 = 3/2), so with c = 2n/(m k)
    E[R^2] = (c^2/4) (5 sum_i E a_i^2 + E (sum_i a_i)^2). Both terms only need the second moments of u and
    of the mask's row counts k_i (fan-ins), column counts d_j and total count N:
    E a_i^2 = gamma E k_i + beta E k_i^2,  E (sum a_i)^2 = gamma sum_j E d_j^2 + beta E N^2.
    Bernoulli: k_i ~ Bin(n, p), d_j ~ Bin(m, p), N ~ Bin(nm, p); constant-per-layer: hypergeometric
    k_i, d_j and fixed N; constant fan-in: k_i = k fixed, d_j ~ Bin(m, p), fixed N.
    """
    n_out = n_in if n_out is None else n_out
    _check_layer(mask_kind, n_in, fan_in, n_out, input_dist)
    n, m, k = float(n_in), float(n_out), float(fan_in)
    p = k / n
    beta, gamma = _input_moments(n_in, input_dist)
    var_cf = (n * n / m) * (gamma * (6.0 - p) / k + 5.0 * beta)
    if mask_kind == "constant_fan_in":
        return var_cf
    if mask_kind == "bernoulli":
        return var_cf + 6.0 * beta * n * n * (1.0 - p) / (m * k)
    return var_cf + n * n * (1.0 - p) / (m * k) * (m - 1.0) / (n * m - 1.0) * (5.0 * beta * n - gamma)


def sample_mask(key: jax.Array, mask_kind: str, n_in: int, n_out: int, fan_in: int) -> jax.Array:
    """A random bool mask (n_in, n_out) of the given kind with average fan-in ``fan_in`` (see module doc)."""
    _check_layer(mask_kind, n_in, fan_in, n_out, "gaussian")
    if mask_kind == "bernoulli":
        return jax.random.bernoulli(key, fan_in / n_in, (n_in, n_out))
    if mask_kind == "constant_fan_in":
        # each neuron keeps the k inputs with the largest i.i.d. uniform scores: a uniform k-subset
        _, idx = jax.lax.top_k(jax.random.uniform(key, (n_out, n_in)), fan_in)
        rows = jnp.zeros((n_out, n_in), bool).at[jnp.arange(n_out)[:, None], idx].set(True)
        return rows.T
    _, idx = jax.lax.top_k(jax.random.uniform(key, (n_in * n_out,)), fan_in * n_out)
    return jnp.zeros((n_in * n_out,), bool).at[idx].set(True).reshape(n_in, n_out)


def _norm_ratios_one_trial(key: jax.Array, mask_kinds: tuple[str, ...], n_in: int, n_out: int, fan_in: int,
                           input_dist: str) -> jax.Array:
    """R for each mask kind, sharing one input and one weight matrix (common random numbers: the
    differences between kinds are then estimated with less noise)."""
    k_x, k_w, *k_masks = jax.random.split(key, 2 + len(mask_kinds))
    if input_dist == "gaussian":
        x = jax.random.normal(k_x, (n_in,))
    else:
        x = jax.random.rademacher(k_x, (n_in,), dtype=jnp.float32)
    w = jax.random.normal(k_w, (n_in, n_out)) * jnp.sqrt(2.0 / fan_in)
    ratios = []
    for kind, k_m in zip(mask_kinds, k_masks):
        z = jax.nn.relu(x @ (w * sample_mask(k_m, kind, n_in, n_out, fan_in)))
        ratios.append((n_in / n_out) * jnp.sum(z * z) / jnp.sum(x * x))
    return jnp.stack(ratios)


@partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _norm_ratios_jit(key, mask_kinds, n_in, n_out, fan_in, input_dist, n_trials, chunk):
    keys = jax.random.split(key, n_trials)
    one = partial(_norm_ratios_one_trial, mask_kinds=mask_kinds, n_in=n_in, n_out=n_out, fan_in=fan_in,
                  input_dist=input_dist)
    return jax.lax.map(one, keys, batch_size=min(chunk, n_trials))


def output_norm_ratios(key: jax.Array, n_in: int, fan_in: int, n_out: int | None = None,
                       n_trials: int = 10_000, input_dist: str = "gaussian",
                       mask_kinds: Sequence[str] = MASK_KINDS, chunk: int = 1024) -> dict[str, jax.Array]:
    """{mask kind: ``n_trials`` independent samples of R}, float32.

    Every trial draws a fresh input and a full weight matrix (no shortcut through the derivation), shared
    by the mask kinds of that trial, and one fresh mask per kind; trials are vmapped in chunks of
    ``chunk`` (bounded memory) under one jit. Deterministic given ``key``.
    """
    n_out = n_in if n_out is None else n_out
    mask_kinds = tuple(mask_kinds)
    for kind in mask_kinds:
        _check_layer(kind, n_in, fan_in, n_out, input_dist)
    if n_trials < 2:
        raise ValueError(f"n_trials must be >= 2, got {n_trials}")
    samples = _norm_ratios_jit(key, mask_kinds, n_in, n_out, fan_in, input_dist, n_trials, chunk)
    return {kind: samples[:, i] for i, kind in enumerate(mask_kinds)}


class VarianceEstimate(NamedTuple):
    """Sample variance of R and its Monte-Carlo standard error (sqrt((mu4 - s^4) / T))."""
    variance: float
    stderr: float
    mean: float
    n_trials: int


def variance_with_stderr(samples: np.ndarray | jax.Array) -> VarianceEstimate:
    """Unbiased sample variance with its large-sample standard error."""
    s = np.asarray(samples, dtype=np.float64)
    t = s.size
    c = s - s.mean()
    var = float(np.sum(c * c) / (t - 1))
    mu4 = float(np.mean(c**4))
    return VarianceEstimate(var, math.sqrt(max(mu4 - var * var, 0.0) / t), float(s.mean()), t)


def simulate_output_norm_variance(key: jax.Array, n_in: int, fan_in: int, n_out: int | None = None,
                                  n_trials: int = 10_000, input_dist: str = "gaussian",
                                  mask_kinds: Sequence[str] = MASK_KINDS) -> dict[str, VarianceEstimate]:
    """{mask kind: Monte-Carlo Var[R] with standard error}; compare with ``output_norm_variance``."""
    ratios = output_norm_ratios(key, n_in, fan_in, n_out, n_trials, input_dist, mask_kinds)
    return {kind: variance_with_stderr(r) for kind, r in ratios.items()}


def output_norm_variance_table(key: jax.Array, n_in: int, fan_ins: Sequence[int], n_out: int | None = None,
                               n_trials: int = 10_000, input_dist: str = "gaussian",
                               progress: bool = False) -> list[dict[str, Any]]:
    """Simulated vs closed-form Var[R] for every mask kind and fan-in: a list of row dicts
    (mask_kind, n_in, n_out, fan_in, simulated, stderr, closed_form, z = (simulated - closed) / stderr)."""
    n_out = n_in if n_out is None else n_out
    rows = []
    it: Iterable = list(fan_ins)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"output-norm variance n={n_in}")
    for k in it:
        sims = simulate_output_norm_variance(jax.random.fold_in(key, k), n_in, k, n_out, n_trials, input_dist)
        for kind, est in sims.items():
            closed = output_norm_variance(kind, n_in, k, n_out, input_dist)
            rows.append(dict(mask_kind=kind, n_in=n_in, n_out=n_out, fan_in=k, simulated=est.variance,
                             stderr=est.stderr, closed_form=closed, z=(est.variance - closed) / est.stderr))
    return rows


def bernoulli_excess_candidates(n_in: int, fan_in: int) -> dict[str, float]:
    """The two readings of the paper's Bernoulli excess over the dense variance 5/n (square layer,
    Gaussian input), in absolute units: ``"18n/k"`` -> (18 / n^2) (n / k) = 18 / (n k) and
    ``"18k/n"`` -> (18 / n^2) (k / n). The exact excess (from ``output_norm_variance``) is
    Var_B - 5/n = 18 (n - k) / (n (n + 2) k), which is the ``18n/k`` reading up to O(k/n, 1/n) corrections;
    simulation confirms it (tests/test_analysis.py)."""
    n, k = float(n_in), float(fan_in)
    return {"18n/k": 18.0 * (n / k) / n**2, "18k/n": 18.0 * (k / n) / n**2}


# ----------------------------------------------------------------------------------------------
# (b) FLOPs (conv / linear kernels only, as in the paper and RigL)
# ----------------------------------------------------------------------------------------------


def is_linear_kernel(path: str, leaf: Any) -> bool:
    """True for Dense/Conv kernels: leaf named ``kernel`` with >= 2 dims (the only layers counted)."""
    return path.split("/")[-1] == "kernel" and np.ndim(leaf) >= 2


def kernel_nnz(tree: Any, dense: bool = False) -> dict[str, int]:
    """{path: number of nonzero (or, with ``dense``, all) entries} of every conv/linear kernel in ``tree``
    (bool masks or parameter arrays)."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = path_str(kp)
        if is_linear_kernel(path, leaf):
            out[path] = int(np.size(leaf)) if dense else int(np.count_nonzero(np.asarray(leaf)))
    return out


def output_positions(model: Any, variables: Mapping[str, Any], x: jax.Array, **apply_kwargs: Any) -> dict[str, int]:
    """{kernel path: output positions per example} for a Flax linen ``model`` from a shape-only trace.

    A Dense applied to (B, features) has 1 position; a Conv with output (B, H, W, C) has H * W; a Dense on
    tokens (B, L, D) has L. Uses ``capture_intermediates`` under ``jax.eval_shape`` (no FLOPs spent).
    """
    def run(v, xx):
        _, state = model.apply(v, xx, capture_intermediates=True, mutable=["intermediates"], **apply_kwargs)
        return state["intermediates"]

    inter = jax.eval_shape(run, variables, x)
    positions = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(inter)[0]:
        path = path_str(kp)
        parts = path.split("/")
        if "__call__" not in parts:
            continue
        module = "/".join(parts[: parts.index("__call__")])
        if not module:  # the top-level module's own output
            continue
        shape = leaf.shape
        positions[module + "/kernel"] = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    return positions


def forward_flops(tree: Any, positions: Mapping[str, int], dense: bool = False,
                  flops_per_mac: int = 2) -> dict[str, int]:
    """Per-example forward FLOPs of each conv/linear kernel: flops_per_mac * nnz * output positions.

    ``tree``: masks or params (nonzeros are counted; ``dense=True`` counts every entry). ``positions``:
    {kernel path: output positions per example} (``output_positions`` builds it for linen models).
    Two FLOPs per multiply-add, as RigL reports (dense ResNet-50: 8.2e9 per example).
    """
    nnz = kernel_nnz(tree, dense=dense)
    missing = sorted(set(nnz) - set(positions))
    if missing:
        raise KeyError(f"no output positions for kernels {missing}; known: {sorted(positions)}")
    return {path: flops_per_mac * c * int(positions[path]) for path, c in nnz.items()}


TRAINING_METHODS = ("dense", "static", "set", "rigl", "srigl", "snfs")


def training_flops_per_step(sparse_fwd: float, dense_fwd: float, method: str, delta_t: int = 100,
                            dense_grad_steps: int = 1) -> float:
    """Average training FLOPs per example per step, RigL's accounting (Evci et al. 2020, Appendix H).

    A step costs forward + backward = f + 2f (gradient w.r.t. activations and w.r.t. weights). Dense:
    3 f_D. Static / SET: 3 f_S. RigL (and SRigL, whose growth also needs the dense gradient): the dense
    weight gradient is needed only on mask-update steps, costing 2 f_S + f_D there; RigL amortises it as

        (3 f_S * delta_t + 2 f_S + f_D) / (delta_t + 1)

    With growth-gradient averaging over ``dense_grad_steps`` = n steps (SRigL's ImageNet setting) n of
    every delta_t + 1 steps pay the dense cost: (3 f_S (delta_t + 1 - n) + n (2 f_S + f_D)) / (delta_t + 1).
    SNFS (dense gradient every step): 2 f_S + f_D.
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"method must be one of {TRAINING_METHODS}, got {method!r}")
    f_s, f_d = float(sparse_fwd), float(dense_fwd)
    if method == "dense":
        return 3.0 * f_d
    if method in ("static", "set"):
        return 3.0 * f_s
    if method == "snfs":
        return 2.0 * f_s + f_d
    if delta_t < 1 or not 1 <= dense_grad_steps <= delta_t + 1:
        raise ValueError(f"need delta_t >= 1 and 1 <= dense_grad_steps <= delta_t + 1, got {delta_t}, "
                         f"{dense_grad_steps}")
    n = dense_grad_steps
    return (3.0 * f_s * (delta_t + 1 - n) + n * (2.0 * f_s + f_d)) / (delta_t + 1)


def training_flops(sparse_fwd: float, dense_fwd: float, method: str, total_steps: int, batch_size: int,
                   delta_t: int = 100, t_end: int | None = None, dense_grad_steps: int = 1) -> float:
    """Total training FLOPs: the amortised per-step cost while mask updates happen (steps < t_end, default
    75% of training), plain 3 f_S after, times the batch size."""
    t_end = int(0.75 * total_steps) if t_end is None else min(int(t_end), total_steps)
    during = training_flops_per_step(sparse_fwd, dense_fwd, method, delta_t, dense_grad_steps)
    after = training_flops_per_step(sparse_fwd, dense_fwd, "static" if method != "dense" else "dense")
    return float(batch_size) * (during * t_end + after * (total_steps - t_end))


class FlopsReport(NamedTuple):
    """Per-example forward FLOPs (sparse and dense) and their ratios; training ratio per RigL accounting."""
    sparse_forward: float
    dense_forward: float
    inference_ratio: float   # sparse / dense
    train_step_ratio: float  # training_flops_per_step(method) / dense 3 f_D


def flops_report(masks: Any, positions: Mapping[str, int], method: str = "srigl", delta_t: int = 100,
                 dense_grad_steps: int = 1) -> FlopsReport:
    """Inference and training FLOPs of a sparse model relative to its dense version."""
    f_s = float(sum(forward_flops(masks, positions).values()))
    f_d = float(sum(forward_flops(masks, positions, dense=True).values()))
    step = training_flops_per_step(f_s, f_d, method, delta_t, dense_grad_steps)
    return FlopsReport(f_s, f_d, f_s / f_d, step / (3.0 * f_d))


# ----------------------------------------------------------------------------------------------
# (c) active neurons and fan-in
# ----------------------------------------------------------------------------------------------


def fan_in_by_layer(masks: Any, plans: Mapping[str, LayerPlan]) -> dict[str, np.ndarray]:
    """{path: per-neuron fan-in array} for the sparse (non-dense) layers of ``plans`` (neurons as the layer's
    layout defines them; a stacked leaf gives one row per slice, ``(n_slices, n_neurons)``, else ``(n_neurons,)``).

    The per-layer scalars (active neurons, max/min fan-in, active-neuron fraction) are in
    ``srigl_jax.sparsity_metrics``; this gives the full per-neuron distribution for histograms.
    """
    flat = {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(masks)[0]}
    missing = [p for p in plans if p not in flat]
    if missing:
        raise KeyError(f"layers {missing} of the plans are not in the mask tree")
    out = {}
    for p, plan in plans.items():
        if not plan.is_dense:
            fan = np.asarray(plan.layout.neuron_fan_in(jnp.asarray(flat[p], bool)))
            out[p] = fan if plan.n_slices > 1 or plan.layout.stack_axes else fan[0]
    return out


def fan_in_histogram(masks: Any, plans: Mapping[str, LayerPlan], include_ablated: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of per-neuron fan-in relative to each layer's mean active fan-in, pooled over sparse layers.

    Returns (bin_centres, counts) with bins of width 0.05 on [0, 3] (relative units make layers of
    different size comparable); a constant fan-in model puts every active neuron in the bin at 1.0.
    Ablated neurons (fan-in 0) are left out unless ``include_ablated``.
    """
    rel = []
    for layer in fan_in_by_layer(masks, plans).values():
        for fan in np.atleast_2d(layer):   # slices of a stacked layer are separate layers
            act = fan[fan > 0]
            if act.size:
                rel.append((fan if include_ablated else act) / act.mean())
    if not rel:
        raise ValueError("no sparse layer with an active neuron in masks")
    edges = np.arange(0.0, 3.0 + 1e-9, 0.05) - 0.025
    counts, edges = np.histogram(np.clip(np.concatenate(rel), 0.0, 2.97), bins=edges)
    return (edges[:-1] + edges[1:]) / 2, counts


# ----------------------------------------------------------------------------------------------
# (d) ITOP (in-time over-parameterisation, Liu et al. 2021)
# ----------------------------------------------------------------------------------------------


def itop_rate_curve(mask_history: Iterable[Any], plans: Mapping[str, LayerPlan]) -> np.ndarray:
    """ITOP rate after each mask tree in ``mask_history`` (e.g. the masks after every mask update):
    the fraction of the sparse layers' positions that were active at least once so far."""
    itop, rates = None, []
    for masks in mask_history:
        itop = init_itop(masks) if itop is None else update_itop(itop, masks)
        rates.append(float(itop_rate(itop, plans)))
    return np.asarray(rates)
