"""Hand-computed mask updates that pin down the selection rule (spec "One mask update of one layer").

Layer: 4 neurons x fan-in 6, written below one ROW PER NEURON for readability (the library works on the
kernel layout (fan_in, neurons) = these arrays transposed), S = 0.5 -> T = 12, k0 = 3, min_active = 3.
Worked by hand for d = 0.5 (n_prune = 6, n_keep = 6):
  active |w| ranking: 7 (r2c3), 6 (r1c0), 5, 4, 3 (r0c0..2), 2 (r2c5) | 0.3, 0.2, 0.1, 0.03, 0.02, 0.01
  top-6 |grad| over all positions: 3 (r2c0), 2 (r0c4), 1 (r0c3), .5 (r0c5), .3 (r1c3), then the zero tie
  goes to the lowest flat index of the kernel (fan-in position first, then neuron): r0c0.
  salient counts: r0 = 6, r1 = 2, r2 = 3, r3 = 0 -> with theta = 1, neuron 3 is ablated; k' = 12 // 3 = 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax as sj
from srigl_jax.layer_updates import srigl_layer_mask, unstructured_layer_mask
from srigl_jax.plans import LayerPlan
from srigl_jax.selection import magnitude_score

W = np.array(
    [
        [5, 4, 3, 0, 0, 0],
        [6, 0.1, 0.2, 0, 0, 0],
        [0, 0, 0, 7, 0.3, 2],
        [0.01, 0.02, 0.03, 0, 0, 0],
    ],
    np.float32,
)
M = W != 0
G = np.array(
    [
        [0, 0, 0, 1, 2, 0.5],
        [0, 0, 0, 0.3, 0, 0],
        [3, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    np.float32,
)
PLAN = LayerPlan("kernel", (6, 4), 0.5, ablatable=True)


def rows(*cols_per_row):
    out = np.zeros((4, 6), bool)
    for r, cols in enumerate(cols_per_row):
        out[r, list(cols)] = True
    return out


def layer(gamma_sal, drop=0.5):
    new_kernel_mask = srigl_layer_mask(
        magnitude_score(jnp.asarray(W.T)), magnitude_score(jnp.asarray(G.T)), jnp.asarray(M.T),
        jnp.float32(drop), PLAN, gamma_sal,
    )
    return np.asarray(new_kernel_mask).T


def test_plan_of_the_worked_example():
    assert (PLAN.nnz_budget, PLAN.k0, PLAN.min_active) == (12, 3, 3)


def test_srigl_with_ablation_by_hand():
    # r0 keeps c0-2 and grows c4 (|g| 2 beats 1 and .5); r1 keeps c0, grows c3 (.3) then the zero-grad
    # tie c1, c2 (lower index first); r2 keeps c3, c5, grows c0 (3) then c1; r3 is ablated.
    np.testing.assert_array_equal(layer(0.5), rows({0, 1, 2, 4}, {0, 1, 2, 3}, {0, 1, 3, 5}, set()))


def test_srigl_without_ablation_by_hand():
    # k' = k0 = 3: r0 is full; r1 grows c3 then c1; r2 grows c0; r3 (all dropped) regrows c0-2 by tie.
    np.testing.assert_array_equal(layer(None), rows({0, 1, 2}, {0, 1, 3}, {0, 3, 5}, {0, 1, 2}))


def test_salience_threshold_counts_and_floor():
    # gamma_sal = 3 (absolute): counts r0 6, r1 2, r2 3, r3 0 -> r1 and r3 fall below, but at least
    # min_active = 3 must survive, so theta is lowered to the 3rd largest count (2): only r3 goes.
    np.testing.assert_array_equal(layer(3.0).any(axis=1), [True, True, True, False])
    # gamma_sal = 0.9 -> theta = max(1, floor(0.9 * 3)) = 2: r3 (0 salient) is ablated, r1 (2) is not.
    np.testing.assert_array_equal(layer(0.9).any(axis=1), [True, True, True, False])


def test_rigl_by_hand():
    # Keep the same 6 by |w|; grow the 6 best |g| among the rest: r2c0, r0c4, r0c3, r0c5, r1c3 and the
    # zero-grad tie at the lowest kernel flat index (fan-in position c, then neuron r) not kept: r3c0.
    got = np.asarray(unstructured_layer_mask(
        magnitude_score(jnp.asarray(W.T)), magnitude_score(jnp.asarray(G.T)), jnp.asarray(M.T), jnp.float32(0.5))).T
    np.testing.assert_array_equal(got, rows({0, 1, 2, 3, 4, 5}, {0, 3}, {0, 3, 5}, {0}))
    assert got.sum() == M.sum()


def test_same_rule_through_the_public_api_with_weights():
    # kernel layout is (fan_in, neurons) = rows.T; d(90) = 1/2 * (1 + cos(0.45 pi)) = 0.578 -> n_prune = floor(6.94) = 6.
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=90, t_end=200, alpha=1.0,
                    gamma_sal=0.5, ablation_exempt=())
    params, grads, masks = {"kernel": jnp.asarray(W.T)}, {"kernel": jnp.asarray(G.T)}, {"kernel": jnp.asarray(M.T)}
    new_params, new_masks = jax.jit(algo.update_masks)(params, grads, masks, jax.random.key(0), 90)
    expected = rows({0, 1, 2, 4}, {0, 1, 2, 3}, {0, 1, 3, 5}, set())
    np.testing.assert_array_equal(np.asarray(new_masks["kernel"]).T, expected)
    # Kept weights keep their values; r1's c1, c2 were dropped and regrown, so they keep 0.1, 0.2;
    # newly grown positions (r0c4, r1c3, r2c0, r2c1) start at 0; the ablated neuron is all zero.
    expected_w = np.array(
        [[5, 4, 3, 0, 0, 0], [6, 0.1, 0.2, 0, 0, 0], [0, 0, 0, 7, 0, 2], [0, 0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(new_params["kernel"]).T, expected_w)


def test_not_an_update_step_returns_inputs():
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=100, t_end=200, ablation_exempt=())
    params, grads, masks = {"kernel": jnp.asarray(W.T)}, {"kernel": jnp.asarray(G.T)}, {"kernel": jnp.asarray(M.T)}
    for step in (0, 99, 101, 200, 300):  # 200, 300: at/after t_end
        p, m = algo.update_masks(params, grads, masks, jax.random.key(0), step)
        np.testing.assert_array_equal(m["kernel"], M.T)
        np.testing.assert_array_equal(p["kernel"], W.T)


def test_random_tie_break_is_seeded_and_changes_tie_winners():
    # All-zero gradients: which positions regrow is decided by the tie-break alone.
    zero_g = jnp.zeros_like(jnp.asarray(G.T))
    results = []
    for seed in range(6):
        algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=90, t_end=200, alpha=1.0,
                        gamma_sal=None, ablation_exempt=(), random_tie_break=True)
        _, m = algo.update_masks({"kernel": jnp.asarray(W.T)}, {"kernel": zero_g},
                                 {"kernel": jnp.asarray(M.T)}, jax.random.key(seed), 90)
        m = np.asarray(m["kernel"])
        assert (m.sum(axis=0) == 3).all()
        results.append(m.tobytes())
    algo_again = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=90, t_end=200, alpha=1.0,
                          gamma_sal=None, ablation_exempt=(), random_tie_break=True)
    _, again = algo_again.update_masks({"kernel": jnp.asarray(W.T)}, {"kernel": zero_g},
                                       {"kernel": jnp.asarray(M.T)}, jax.random.key(0), 90)
    assert np.asarray(again["kernel"]).tobytes() == results[0]
    assert len(set(results)) > 1


@pytest.mark.parametrize("step, expected", [(0, 0.3), (50, 0.15), (100, 0.0)])
def test_cosine_drop_fraction(step, expected):
    algo = sj.SRigL(sparsity=0.5, t_end=100)
    assert float(algo.drop_fraction(step)) == pytest.approx(expected, abs=1e-6)


def test_update_steps_schedule():
    algo = sj.SRigL(sparsity=0.5, delta_t=10, t_end=35)
    steps = [s for s in range(0, 60) if bool(algo.is_update_step(s))]
    assert steps == [10, 20, 30]
    assert not any(bool(sj.Static(sparsity=0.5).is_update_step(s)) for s in range(0, 60))
