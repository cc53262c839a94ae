"""Models: forward passes at small sizes, real constructors via eval_shape, sparsity declarations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax as sj
from train.configs import CONFIGS, get_config
from train.loop import make_algo
from train.models import MODELS, build_model, get_model_spec, init_variables

# (model, constructor overrides, input shape) small enough for a CPU forward pass in a test
SMALL = {
    "mlp": ({}, (28, 28, 1)),
    "cnn": ({"channels": (4, 8), "hidden": 16}, (28, 28, 1)),
    "resnet18": ({"width": 4, "stage_sizes": (1, 1, 1, 1)}, (32, 32, 3)),
    "wrn22": ({"depth": 10, "widen": 1}, (32, 32, 3)),
    "resnet50": ({"width": 4, "stage_sizes": (1, 1, 1, 1)}, (64, 64, 3)),
    "vit_b16": ({"patch": 8, "dim": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}, (32, 32, 3)),
}


# Bottleneck / WideBlock code is traced unmarked by the eval_shape tests below; compiling them is slow on 2 cores.
@pytest.mark.parametrize("name", [n if n in ("mlp", "cnn", "resnet18", "vit_b16") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(SMALL)])
def test_small_forward_pass(name):
    kwargs, shape = SMALL[name]
    model, spec = build_model(name, **kwargs)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, *shape))

    @jax.jit  # one compilation: init, inference forward, training forward (BatchNorm statistics update)
    def init_and_apply(key, x):
        variables = init_variables(model, shape, key)
        mutable = ["batch_stats"] if spec.has_batch_stats else []
        _, new_state = model.apply(variables, x, train=True, mutable=mutable)
        return variables, model.apply(variables, x, train=False), new_state

    variables, logits, new_state = init_and_apply(jax.random.PRNGKey(0), x)
    assert logits.shape == (3, spec.num_classes)
    assert np.all(np.isfinite(np.asarray(logits)))
    assert ("batch_stats" in variables) == spec.has_batch_stats
    if spec.has_batch_stats:  # train mode must update BatchNorm statistics
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], new_state["batch_stats"])
        assert any(jax.tree.leaves(changed))


def _param_count(shapes):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# Parameter counts of the reference architectures (torchvision / the WRN and LeNet papers), to catch a
# wrong real-size constructor without running it. CIFAR ResNet-18 = 11.17M; WRN-22-2 = 1.09M.
@pytest.mark.parametrize("name,shape,expected", [
    ("mlp", (28, 28, 1), 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),
    ("resnet18", (32, 32, 3), 11_173_962),
    ("resnet50", (224, 224, 3), 25_557_032),
    ("vit_b16", (224, 224, 3), 86_567_656),
])
def test_real_constructor_parameter_count(name, shape, expected):
    model, spec = build_model(name)
    shapes = jax.eval_shape(lambda k: init_variables(model, shape, k), jax.random.PRNGKey(0))
    assert _param_count(shapes["params"]) == expected
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *shape)), train=False), shapes)
    assert out.shape == (2, spec.num_classes)


def test_wrn22_real_shape_and_blocks():
    model, _ = build_model("wrn22", widen=2)
    shapes = jax.eval_shape(lambda k: init_variables(model, (32, 32, 3), k), jax.random.PRNGKey(0))["params"]
    groups = sorted(k for k in shapes if k.startswith("group"))
    assert len(groups) == 9  # (22 - 4) / 6 = 3 blocks per group
    assert shapes["group3_2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert 1.0e6 < _param_count(shapes) < 1.2e6


def _plans(config_name, **overrides):
    cfg = get_config(config_name, **overrides)
    model, spec = build_model(cfg.model, **cfg.model_kwargs)
    shapes = jax.eval_shape(lambda k: init_variables(model, spec.input_shape, k), jax.random.PRNGKey(0))
    return make_algo(cfg, spec, 1000).layer_plans(shapes["params"])


def test_vit_attention_in_projections_dense_and_head_exempt():
    plans = _plans("imagenet_vit_b16")
    for blk in range(12):
        for proj in ("query", "key", "value"):
            assert plans[f"block{blk}/attn/{proj}/kernel"].is_dense
        assert not plans[f"block{blk}/attn/out/kernel"].is_dense
        assert not plans[f"block{blk}/mlp_fc1/kernel"].is_dense
        assert plans[f"block{blk}/mlp_fc1/kernel"].ablatable
    assert plans["patch_embed/kernel"].is_dense  # recipe: first layer dense
    assert not plans["head/kernel"].is_dense and not plans["head/kernel"].ablatable
    # uniform over the sparse layers only (sparsity_over="sparse"): every sparse layer is exactly 90% sparse
    sparse = {round(p.sparsity, 6) for p in plans.values() if not p.is_dense}
    assert sparse == {0.9}


@pytest.mark.parametrize("config_name", ["cifar10_resnet18", "imagenet_resnet50"])
def test_cnn_declarations(config_name):
    cfg = CONFIGS[config_name]
    plans = _plans(config_name)
    if cfg.dense_first_layer:
        assert plans["stem/kernel"].is_dense
    assert not plans["head/kernel"].ablatable
    assert all(p.ablatable for path, p in plans.items() if path != "head/kernel" and not p.is_dense)
    # only kernels are sparse candidates: no BatchNorm scale/bias, no biases
    assert all(path.endswith("/kernel") for path in plans)


def test_dense_first_layer_override_selects_the_stem_not_the_first_path():
    # natural path order would put "head" first in a ResNet; the model's own regex must pick "stem"
    # (uniform: under ERK the tiny 3x3x3 stem is dense anyway)
    plans = _plans("cifar10_resnet18", dense_first_layer=True, distribution="uniform")
    assert plans["stem/kernel"].is_dense and not plans["head/kernel"].is_dense
    plans = _plans("cifar10_resnet18", dense_first_layer=False, distribution="uniform")
    assert not plans["stem/kernel"].is_dense


def test_every_model_declares_existing_paths():
    for name, spec in MODELS.items():
        kwargs, shape = SMALL[name]
        model, _ = build_model(name, **kwargs)
        params = jax.eval_shape(lambda k: init_variables(model, shape, k), jax.random.PRNGKey(0))["params"]
        paths = [p for p, _ in sj.paths.named_leaves(params)[0]]
        for regex in (spec.first_layer, *spec.ablation_exempt, *spec.dense_paths):
            assert any(sj.paths.matches_any(p, [regex]) for p in paths), f"{name}: {regex} matches no path"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="known models"):
        get_model_spec("resnet9000")
