"""Layer selection and per-layer sparsity distributions, against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax as sj
from srigl_jax.plans import build_plans, layer_sparsities

TORCH_SHAPES = [(64, 3, 7, 7), (64, 64, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (1000, 256)]


def flax_layout(shape):
    """torch (out, in, kh, kw) / (out, in) -> flax (kh, kw, in, out) / (in, out)."""
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return (shape[1], shape[0])


def test_erk_matches_hand_computed_values_in_both_layouts():
    expected = [0.7195, 0.8816, 0.9125, 0.9569, 0.8401]
    for to_layout in (lambda s: s, flax_layout):
        shapes = {f"l{i}": to_layout(s) for i, s in enumerate(TORCH_SHAPES)}
        got = layer_sparsities(shapes, 0.9, "erk")
        np.testing.assert_allclose([got[f"l{i}"] for i in range(5)], expected, atol=5e-5)


def test_erk_preserves_global_budget_and_redistributes_dense_layers():
    # A tiny layer whose ERK density would exceed 1 becomes dense; the rest is re-solved.
    shapes = {"a": (3, 4), "b": (300, 400), "c": (400, 10)}
    got = layer_sparsities(shapes, 0.95, "erk")
    assert got["a"] == 0.0
    numel = {p: np.prod(s) for p, s in shapes.items()}
    kept = sum((1 - got[p]) * numel[p] for p in shapes)
    assert kept == pytest.approx(0.05 * sum(numel.values()))
    # Without the dense layer, ERK ratios between the others are sum/prod ratios.
    ratio = (1 - got["b"]) / (1 - got["c"])
    assert ratio == pytest.approx((700 / 120000) / (410 / 4000))


def test_uniform_rescales_when_a_layer_is_forced_dense():
    shapes = {"first": (10, 100), "rest": (100, 100)}
    got = layer_sparsities(shapes, 0.9, "uniform", {"first"})
    # budget 0.1 * 11000 = 1100; dense layer uses 1000; the other keeps 100 of 10000.
    assert got == {"first": 0.0, "rest": pytest.approx(0.99)}


def test_explicit_dict_and_unknown_path():
    shapes = {"a": (4, 4), "b": (4, 4)}
    assert layer_sparsities(shapes, {"a": 0.5}, "erk") == {"a": 0.5, "b": 0.0}
    with pytest.raises(ValueError, match="unknown layer paths.*nope"):
        layer_sparsities(shapes, {"nope": 0.5}, "erk")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layer_sparsities(shapes, {"a": 1.0}, "erk")


def test_infeasible_budget_raises():
    with pytest.raises(ValueError, match="infeasible"):
        layer_sparsities({"a": (10, 10), "b": (10, 10)}, 0.75, "uniform", {"a"})


def mlp_params():
    return {
        "Dense_0": {"kernel": jnp.zeros((20, 10)), "bias": jnp.zeros(10)},
        "Dense_2": {"kernel": jnp.zeros((10, 10)), "bias": jnp.zeros(10)},
        "Dense_10": {"kernel": jnp.zeros((10, 4)), "bias": jnp.zeros(4)},
        "LayerNorm_0": {"scale": jnp.ones(10), "bias": jnp.zeros(10)},
        "Embed_0": {"embedding": jnp.zeros((7, 10))},
        "attn": {"query": {"kernel": jnp.zeros((10, 2, 5))}, "out": {"kernel": jnp.zeros((2, 5, 10))}},
    }


def test_default_filter_natural_order_and_classifier_exemption():
    plans = build_plans(mlp_params(), 0.5, "uniform")
    # biases, norms, embeddings are never candidates; the attention in-projection is a dense candidate.
    assert list(plans) == ["Dense_0/kernel", "Dense_2/kernel", "Dense_10/kernel",
                           "attn/out/kernel", "attn/query/kernel"]
    assert plans["attn/query/kernel"].is_dense
    # The classifier is the last top-level Dense kernel, not the last path (attn/query).
    assert [p for p, pl in plans.items() if not pl.ablatable] == ["Dense_10/kernel"]


def test_default_first_layer_and_classifier_follow_the_network_not_the_alphabet():
    # ResNet-like names: natural path order puts "head" before "stem" and nests the blocks.
    params = {"stem": {"kernel": jnp.zeros((3, 3, 3, 16))},
              "block0": {"conv1": {"kernel": jnp.zeros((3, 3, 16, 16))}},
              "block1": {"conv1": {"kernel": jnp.zeros((3, 3, 16, 16))}},
              "head": {"kernel": jnp.zeros((16, 10))}}
    plans = build_plans(params, 0.5, "uniform", dense_first_layer=True)
    assert [p for p, pl in plans.items() if pl.is_dense] == ["stem/kernel"]
    assert [p for p, pl in plans.items() if not pl.ablatable] == ["head/kernel"]


def test_sparse_densegeneral_in_projection_is_rejected():
    params = {"attn": {"query": {"kernel": jnp.zeros((16, 4, 8))}}, "out": {"kernel": jnp.zeros((160, 100))}}
    with pytest.raises(ValueError, match="attn/query/kernel.*DenseGeneral"):
        build_plans(params, 0.5, "uniform", dense_paths=())
    assert build_plans(params, 0.5, "uniform")["attn/query/kernel"].is_dense  # default: kept dense


def test_numpy_scalar_sparsity_is_accepted():
    assert sj.SRigL(sparsity=np.float32(0.9), t_end=10).sparsity == np.float32(0.9)


def test_dense_first_layer_and_explicit_exemptions():
    params = {k: v for k, v in mlp_params().items() if k != "attn"}
    plans = build_plans(params, 0.3, "uniform", dense_first_layer=True, ablation_exempt=(r"Dense_2/",))
    assert plans["Dense_0/kernel"].is_dense
    assert not plans["Dense_2/kernel"].ablatable and plans["Dense_10/kernel"].ablatable


def test_layer_plan_budget_and_fan_in():
    plan = build_plans({"Conv_0": {"kernel": jnp.zeros((3, 3, 8, 16))}}, 0.9, "uniform")["Conv_0/kernel"]
    assert (plan.fan_in, plan.n_neurons, plan.numel) == (72, 16, 1152)
    assert plan.nnz_budget == 115  # floor(1152 * 0.1), not 115.2 rounded up
    assert plan.k0 == 7 and plan.min_active == 2
    # 0.1 * 100 is 9.999999999999998 in floating point: the budget must still be 10.
    assert build_plans({"kernel": jnp.zeros((10, 10))}, 0.9, "uniform")["kernel"].nnz_budget == 10


def test_zero_fan_in_names_the_layer():
    with pytest.raises(ValueError, match="Dense_1/kernel.*fan-in k0 would be 0"):
        build_plans({"Dense_0": {"kernel": jnp.zeros((100, 100))},
                     "Dense_1": {"kernel": jnp.zeros((2, 100))}}, 0.9, "uniform")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.9", True])
def test_bad_sparsity_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        sj.SRigL(sparsity=bad, t_end=10)


def test_non_float_kernel_and_missing_layers():
    with pytest.raises(TypeError, match="Dense_0/kernel.*non-float"):
        build_plans({"Dense_0": {"kernel": jnp.zeros((4, 4), jnp.int32)}}, 0.5, "uniform")
    with pytest.raises(ValueError, match="no sparse layers"):
        build_plans({"bias": jnp.zeros(3)}, 0.5, "uniform")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma_sal=-0.1), "gamma_sal"),
        (dict(distribution="random"), "distribution"),
        (dict(delta_t=0), "delta_t"),
        (dict(alpha=1.5), "alpha"),
        (dict(grad_accumulation_steps=200), "grad_accumulation_steps"),
        (dict(init="xavier"), "init"),
    ],
)
def test_bad_configuration_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sj.SRigL(sparsity=0.9, t_end=100, **kwargs)


def _nested_mlp(wrapper=None):
    body = {"encoder": {"Dense_0": {"kernel": jnp.zeros((20, 16))}, "Dense_1": {"kernel": jnp.zeros((16, 16))}},
            "classifier": {"kernel": jnp.zeros((16, 4))}}
    return {wrapper: body} if wrapper else body


@pytest.mark.parametrize("wrapper", [None, "params"])
def test_first_layer_by_position_in_a_nested_model_is_an_error_not_the_classifier(wrapper):
    """Reported: with the body nested, dense_first_layer=True made the classifier dense and left the first
    layer sparse. The paths alone cannot tell which encoder layer comes first: an error asks for a path."""
    params = _nested_mlp(wrapper)
    with pytest.raises(ValueError, match="first layer.*dense_first_layer='<regex"):
        build_plans(params, 0.5, "uniform", dense_first_layer=True)
    plans = build_plans(params, 0.3, "uniform", dense_first_layer=r"encoder/Dense_0/")
    assert [p for p, pl in plans.items() if pl.is_dense] == [f"{wrapper + '/' if wrapper else ''}encoder/Dense_0/kernel"]
    assert [p for p, pl in plans.items() if not pl.ablatable] == [
        f"{wrapper + '/' if wrapper else ''}classifier/kernel"]   # the one top-level 2-D kernel
    with pytest.raises(ValueError, match="matches no sparse candidate"):
        build_plans(params, 0.5, "uniform", dense_first_layer=r"decoder/")


def test_first_layer_and_classifier_of_a_wrapped_flat_model():
    params = {"params": {f"Dense_{i}": {"kernel": jnp.zeros((8, 8))} for i in (0, 1, 2, 10)}}
    plans = build_plans(params, 0.5, "uniform", dense_first_layer=True)
    assert [p for p, pl in plans.items() if pl.is_dense] == ["params/Dense_0/kernel"]
    assert [p for p, pl in plans.items() if not pl.ablatable] == ["params/Dense_10/kernel"]


def test_ambiguous_classifier_is_an_error():
    params = {"block": {"Dense_0": {"kernel": jnp.zeros((8, 8))}},
              "head_a": {"kernel": jnp.zeros((8, 4))}, "head_b": {"kernel": jnp.zeros((8, 4))}}
    with pytest.raises(ValueError, match="last layer.*ablation_exempt"):
        build_plans(params, 0.5, "uniform")
    assert not build_plans(params, 0.5, "uniform", ablation_exempt=("head_b",))["head_b/kernel"].ablatable


def test_uniform_sparse_gives_every_sparse_layer_exactly_s():
    shapes = {"a": (10, 10), "b": (40, 10), "c": (40, 5)}
    assert layer_sparsities(shapes, 0.7, "uniform_sparse", {"a"}) == {"a": 0.0, "b": 0.7, "c": 0.7}
    uniform = layer_sparsities(shapes, 0.7, "uniform", {"a"})   # the global budget instead: others sparser
    assert uniform["b"] > 0.7 and uniform["b"] == uniform["c"]
    with pytest.raises(ValueError, match="distribution must be one of"):
        sj.SRigL(sparsity=0.9, t_end=10, distribution="uniform_all")
