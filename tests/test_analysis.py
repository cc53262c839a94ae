"""Tests for srigl_jax.analysis: Appendix A output-norm variance (closed forms vs Monte-Carlo), FLOPs,
fan-in / active neurons, ITOP curves, and a smoke test of the plotting helpers."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax as sj
from srigl_jax import analysis as A

# ------------------------------------------------------------------ output-norm variance: simulation


@pytest.fixture(scope="module")
def sim_gaussian_32_2():
    """One simulation (all three mask kinds share inputs and weights), reused by several tests."""
    return A.simulate_output_norm_variance(jax.random.PRNGKey(0), n_in=32, fan_in=2, n_trials=20_000)


def test_mask_samplers_have_the_right_counts():
    key = jax.random.PRNGKey(1)
    cpl = np.asarray(A.sample_mask(key, "constant_per_layer", 20, 7, 3))
    assert cpl.sum() == 21 and cpl.sum(axis=0).std() > 0  # fixed total, varying fan-in
    bern = jax.vmap(lambda k: A.sample_mask(k, "bernoulli", 20, 7, 3))(jax.random.split(key, 50))
    assert abs(bern.mean() - 3 / 20) < 0.02
    # the constant fan-in positions are uniform over inputs (no bias to low indices)
    many = jax.vmap(lambda k: A.sample_mask(k, "constant_fan_in", 10, 50, 2))(jax.random.split(key, 40))
    assert many.shape == (40, 10, 50) and (np.asarray(many).sum(axis=1) == 2).all()
    counts = np.asarray(many).sum(axis=(0, 2))
    assert counts.min() > 0.75 * counts.mean()


def test_simulation_matches_closed_forms_gaussian(sim_gaussian_32_2):
    for kind, est in sim_gaussian_32_2.items():
        closed = A.output_norm_variance(kind, 32, 2)
        assert abs(est.mean - 1.0) < 5 * math.sqrt(est.variance / est.n_trials), kind  # E[R] = 1
        assert abs(est.variance - closed) < 4 * est.stderr, (kind, est, closed)


def test_simulation_matches_closed_forms_sign_inputs_rectangular_layer():
    sims = A.simulate_output_norm_variance(jax.random.PRNGKey(2), n_in=24, fan_in=3, n_out=40, n_trials=10_000,
                                           input_dist="sign")
    for kind, est in sims.items():
        closed = A.output_norm_variance(kind, 24, 3, 40, "sign")
        assert abs(est.variance - closed) < 4 * est.stderr, (kind, est, closed)


def test_constant_fan_in_has_the_smallest_simulated_variance(sim_gaussian_32_2):
    cf = sim_gaussian_32_2["constant_fan_in"]
    for kind in ("bernoulli", "constant_per_layer"):
        other = sim_gaussian_32_2[kind]
        assert cf.variance + 3 * cf.stderr < other.variance - 3 * other.stderr, kind


def test_bernoulli_excess_is_18n_over_k_not_18k_over_n(sim_gaussian_32_2):
    """The paper prints both 18k/n and 18n/k; the simulated excess over the dense 5/n picks 18n/k."""
    n, k = 32, 2
    est = sim_gaussian_32_2["bernoulli"]
    excess = est.variance - 5.0 / n
    cand = A.bernoulli_excess_candidates(n, k)
    exact = 18.0 * (n - k) / (n * (n + 2) * k)
    assert abs(excess - exact) < 4 * est.stderr
    assert abs(excess - cand["18k/n"]) > 20 * est.stderr
    assert abs(excess - cand["18n/k"]) / cand["18n/k"] < 0.15  # equal up to the O(k/n, 1/n) corrections


# ------------------------------------------------------------------ output-norm variance: closed forms


@pytest.mark.parametrize("input_dist", A.INPUT_KINDS)
def test_closed_forms_reduce_to_the_dense_value_at_full_fan_in(input_dist):
    # dense He-initialised ReLU layer: Var = 5/m (for Gaussian inputs the same, since u's spread cancels)
    for n, m in ((16, 16), (20, 33)):
        for kind in A.MASK_KINDS:
            assert A.output_norm_variance(kind, n, n, m, input_dist) == pytest.approx(5.0 / m, rel=1e-12)


def test_closed_form_ordering_and_growth_with_sparsity():
    for n in (16, 64, 256):
        prev_gap = None
        for k in sorted({n // 2, n // 4, n // 8, 2}, reverse=True):
            v = {kind: A.output_norm_variance(kind, n, k) for kind in A.MASK_KINDS}
            assert v["constant_fan_in"] < v["constant_per_layer"] < v["bernoulli"]
            gap = v["bernoulli"] - v["constant_fan_in"]
            assert prev_gap is None or gap > prev_gap  # the advantage grows as k << n
            prev_gap = gap


def test_closed_form_bernoulli_excess_identity():
    for n, k in ((10, 1), (64, 4), (300, 30)):
        excess = A.output_norm_variance("bernoulli", n, k) - 5.0 / n
        assert excess == pytest.approx(18.0 * (n - k) / (n * (n + 2) * k), rel=1e-12)


def test_bad_variance_arguments_raise():
    with pytest.raises(ValueError, match="fan_in"):
        A.output_norm_variance("bernoulli", 8, 9)
    with pytest.raises(ValueError, match="mask_kind"):
        A.output_norm_variance("random", 8, 2)
    with pytest.raises(ValueError, match="input_dist"):
        A.output_norm_variance("bernoulli", 8, 2, input_dist="uniform")


# ------------------------------------------------------------------ FLOPs


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x))  # 8x8 -> 4x4
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(5, name="fc")(x))
        return nn.Dense(3, name="head")(x)


def _net():
    model = _Net()
    x = jnp.zeros((2, 8, 8, 2))
    variables = model.init(jax.random.PRNGKey(0), x)
    return model, variables, x


def test_output_positions_from_a_shape_trace():
    model, variables, x = _net()
    pos = A.output_positions(model, variables, x)
    assert pos == {"conv/kernel": 16, "fc/kernel": 1, "head/kernel": 1}


def test_forward_flops_dense_and_sparse():
    model, variables, x = _net()
    params = variables["params"]
    pos = A.output_positions(model, variables, x)
    dense = A.forward_flops(params, pos, dense=True)
    assert dense == {"conv/kernel": 2 * 3 * 3 * 2 * 4 * 16, "fc/kernel": 2 * 64 * 5, "head/kernel": 2 * 5 * 3}
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    masks["fc"]["kernel"] = masks["fc"]["kernel"].at[:40].set(False)  # 24 of 64 rows left
    masks["conv"]["kernel"] = masks["conv"]["kernel"].at[0].set(False)  # 2 of 3 kernel rows left
    sparse = A.forward_flops(masks, pos)
    assert sparse["fc/kernel"] == 2 * 24 * 5
    assert sparse["conv/kernel"] == 2 * 2 * 3 * 2 * 4 * 16
    assert sparse["head/kernel"] == dense["head/kernel"]
    with pytest.raises(KeyError, match="head/kernel"):
        A.forward_flops(masks, {"conv/kernel": 16, "fc/kernel": 1})


def test_training_flops_match_a_step_by_step_count():
    """RigL accounting: a dense-gradient step costs 2 f_S + f_D, any other step 3 f_S."""
    f_s, f_d = 3.0, 20.0
    for delta_t, n_dense in ((9, 1), (7, 3)):
        cycle = [2 * f_s + f_d] * n_dense + [3 * f_s] * (delta_t + 1 - n_dense)
        assert A.training_flops_per_step(f_s, f_d, "rigl", delta_t, n_dense) == pytest.approx(np.mean(cycle))
    assert A.training_flops_per_step(f_s, f_d, "rigl", 9) == pytest.approx((3 * f_s * 9 + 2 * f_s + f_d) / 10)
    assert A.training_flops_per_step(f_s, f_d, "dense") == 3 * f_d
    assert A.training_flops_per_step(f_s, f_d, "static") == 3 * f_s
    assert A.training_flops_per_step(f_s, f_d, "snfs") == 2 * f_s + f_d
    # total: amortised cost until t_end, static cost after
    total = A.training_flops(f_s, f_d, "srigl", total_steps=100, batch_size=4, delta_t=9, t_end=60)
    assert total == pytest.approx(4 * (60 * (3 * f_s + (f_d - f_s) / 10) + 40 * 3 * f_s))
    with pytest.raises(ValueError, match="method"):
        A.training_flops_per_step(f_s, f_d, "magic")


def test_flops_report_of_a_real_srigl_mask():
    model, variables, x = _net()
    algo = sj.SRigL(sparsity=0.8, distribution="uniform", delta_t=10, t_end=100)
    masks = algo.init_masks(variables["params"], jax.random.PRNGKey(3))
    rep = A.flops_report(masks, A.output_positions(model, variables, x), "srigl", delta_t=10)
    nnz = A.kernel_nnz(masks)
    pos = A.output_positions(model, variables, x)
    assert rep.sparse_forward == 2 * sum(nnz[p] * pos[p] for p in nnz)
    assert 0.1 < rep.inference_ratio < 0.4
    assert rep.inference_ratio < rep.train_step_ratio < 1.0


# ------------------------------------------------------------------ fan-in, ITOP


def _mlp_params():
    return {"fc1": {"kernel": jnp.zeros((30, 12)), "bias": jnp.zeros(12)},
            "head": {"kernel": jnp.zeros((12, 4)), "bias": jnp.zeros(4)}}


def test_fan_in_by_layer_and_histogram_constant_vs_unstructured():
    params = _mlp_params()
    srigl = sj.SRigL(sparsity=0.7, distribution="uniform", delta_t=10, t_end=100)
    rigl = sj.RigL(sparsity=0.7, distribution="uniform", delta_t=10, t_end=100)
    plans = srigl.layer_plans(params)
    m_s = srigl.init_masks(params, jax.random.PRNGKey(0))
    m_r = rigl.init_masks(params, jax.random.PRNGKey(0))
    fan_s = A.fan_in_by_layer(m_s, plans)
    assert set(fan_s) == {p for p, plan in plans.items() if not plan.is_dense}
    for p, f in fan_s.items():
        assert f.shape == (plans[p].n_neurons,) and (f == plans[p].k0).all()
    centres, counts = A.fan_in_histogram(m_s, plans)
    assert counts.sum() == sum(plan.n_neurons for plan in plans.values() if not plan.is_dense)
    assert counts[np.argmin(abs(centres - 1.0))] == counts.sum()
    _, counts_r = A.fan_in_histogram(m_r, rigl.layer_plans(params))
    assert counts_r.max() < counts_r.sum()  # unstructured: spread over several bins
    # an ablated neuron is visible in the per-neuron fan-in
    m_abl = jax.tree.map(lambda m: m, m_s)
    m_abl["fc1"]["kernel"] = m_abl["fc1"]["kernel"].at[:, 5].set(False)
    assert A.fan_in_by_layer(m_abl, plans)["fc1/kernel"][5] == 0


def test_itop_rate_curve_counts_positions_ever_active():
    params = {"fc": {"kernel": jnp.zeros((4, 2))}}
    plans = sj.Static(sparsity=0.5, distribution="uniform").layer_plans(params)
    m1 = {"fc": {"kernel": jnp.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)}}
    m2 = {"fc": {"kernel": jnp.array([[0, 1], [1, 0], [0, 1], [1, 0]], bool)}}  # 2 new positions
    curve = A.itop_rate_curve([m1, m2, m1], plans)
    np.testing.assert_allclose(curve, [0.5, 0.75, 0.75])


# ------------------------------------------------------------------ plotting smoke test


def test_plots_return_figures_and_save_png(tmp_path):
    from srigl_jax import plotting as P
    rows = [dict(mask_kind=kind, n_in=16, n_out=16, fan_in=k, simulated=A.output_norm_variance(kind, 16, k) * 1.01,
                 stderr=0.01, closed_form=A.output_norm_variance(kind, 16, k), z=0.0)
            for kind in A.MASK_KINDS for k in (2, 4, 8)]
    fig = P.plot_output_norm_variance(rows, save_path=tmp_path / "var.png")
    assert (tmp_path / "var.png").stat().st_size > 1000 and len(fig.axes) == 1
    fig2 = P.plot_fan_in_histograms({"a": np.array([1, 2, 2, 3]), "b": np.array([2, 2, 2, 2])})
    fig3 = P.plot_history_grid({"run": {"step": [1, 2], "acc": [0.1, 0.2]}}, ["acc"])
    fig4 = P.plot_bernoulli_excess(16, [2, 4], [0.3, 0.1], [0.01, 0.01])
    fig5 = P.plot_bars({"dense": 1.0, "condensed": 0.3}, "ms")
    for f in (fig, fig2, fig3, fig4, fig5):
        P.plt.close(f)
