"""sj.condense: whole unchanged models (linen by interception, NNX by graph surgery) equal model.apply for every
kernel, under jit, after an Orbax round trip; the per-layer choice, its override and every error case."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import srigl_jax as sj
from srigl_jax import _ffi_kernels
from srigl_jax.inference import KERNELS, CondensedDense, CondensedLinear, Timing, densify, export_condensed
from srigl_jax.inference.layers import pad_slices
from tests.test_layout import NNXStacked, ScannedMLP, scanned_mlp_trained_with_srigl
from train.models import MLP, ResNet, SmallCNN, ViT, BasicBlock, Bottleneck

FAST_TIMING = Timing(reps=2, budget_s=0.05)  # the choice runs, its outcome is not asserted (shared CPUs)
FFI = pytest.mark.skipif(not _ffi_kernels.available(), reason="C++ kernel unavailable")
EVAL = {"train": False}


def sparse_model(model, input_shape, sparsity=0.9, ablate=(), seed=0, **algo_kwargs):
    """Variables with 90% SRigL constant fan-in masks (params zero outside), random BatchNorm statistics, and
    the output neurons ``ablate`` ({path: [neurons]}) of some layers ablated (mask columns all False)."""
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((3, *input_shape)), jnp.float32)
    variables = model.init(jax.random.key(seed), x, train=False)
    algo = sj.SRigL(sparsity=sparsity, t_end=100, **algo_kwargs)
    masks = algo.init_masks(variables["params"], jax.random.key(seed + 1))
    for path, neurons in dict(ablate).items():
        masks = _edit(masks, f"{path}/kernel", lambda m: m.at[..., jnp.asarray(neurons)].set(False))
    params = algo.init_params(variables["params"], masks, jax.random.key(seed + 2))
    params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 1 else p, params)  # nonzero biases
    rng = np.random.default_rng(seed + 3)
    stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype),
                         variables.get("batch_stats", {}))
    out = {**variables, "params": params}
    if stats:
        out["batch_stats"] = stats
    return out, masks, x


def _edit(tree, path, fn):
    head, _, rest = path.partition("/")
    return {**tree, head: _edit(tree[head], rest, fn) if rest else fn(tree[head])}


def assert_same(fast, model, variables, x, eager=False, **kwargs):
    """fast equals model.apply, both jitted (the functional form, variables as arguments); eager too if asked."""
    want = jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)
    jitted = jax.jit(lambda v, x: fast.apply(v, x, **kwargs))(fast.variables, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(want), rtol=1e-5, atol=1e-5)
    if eager:
        np.testing.assert_allclose(np.asarray(fast(x, **kwargs)), np.asarray(want), rtol=1e-5, atol=1e-5)


def kinds(fast):
    return {c.path: c.kernel for c in fast.choices}


# ---------------------------------------------------------------------------------------------- equivalence
LINEAR_KERNELS = ["structured", "condensed_xla", pytest.param("condensed_ffi", marks=FFI)]
CONV_KERNELS = ["structured", "conv_patches_xla", pytest.param("conv_patches_ffi", marks=FFI)]


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
def test_mlp_every_linear_kernel_equals_apply(kernel):
    model = MLP(hidden=(48, 24))
    variables, masks, x = sparse_model(model, (6, 6, 1), ablate={"fc1": [0, 5, 7], "fc2": [3], "head": [2]})
    fast = sj.condense(model, variables, masks, example=x, kernels={".": kernel})
    assert set(kinds(fast).values()) == {kernel}
    assert_same(fast, model, variables, x, eager=True)
    fc1 = next(c for c in fast.choices if c.path == "fc1")
    assert (fc1.n_active, fc1.n_out, fc1.kernel_shape, fc1.input_shapes) == (45, 48, (36, 48), ((3, 36),))


@pytest.mark.parametrize("kernel", CONV_KERNELS)
def test_cnn_every_conv_kernel_equals_apply(kernel):
    model = SmallCNN(channels=(8, 12), hidden=16)
    variables, masks, x = sparse_model(model, (10, 10, 2), ablate={"stem": [1], "conv2": [0, 4]})
    fast = sj.condense(model, variables, masks, example=x,
                       kernels={"stem|conv": kernel, "fc|head": "condensed_xla"})
    assert kinds(fast)["conv2"] == kernel
    assert_same(fast, model, variables, x)


@pytest.mark.parametrize("kernel", ["conv_direct_xla", pytest.param("conv_direct_ffi", marks=FFI), "conv_patches_xla"])
def test_resnet50_style_bottlenecks_equal_apply(kernel):
    """train/models.py's ResNet-50 blocks (Bottleneck: 1x1 -> 3x3 strided -> 1x1 x4, projected shortcuts) behind
    the ImageNet stem (7x7 stride 2, max-pool), narrow and short: every conv replaced, ablated neurons in the
    middle of a block and on a block's output (before the residual add)."""
    model = ResNet(stage_sizes=(1, 2), block=Bottleneck, width=4, cifar_stem=False)
    variables, masks, x = sparse_model(model, (24, 24, 3),
                                       ablate={"stage1_0/conv2": [1], "stage2_1/conv3": [0, 5], "stem": [3]})
    fast = sj.condense(model, variables, masks, example=x, apply_kwargs=EVAL,
                       kernels={"stem|conv|shortcut": kernel, "head": "condensed_xla"})
    assert len(fast.choices) == 3 * 3 + 2 + 2  # 3 blocks of 3 convs, 2 projected shortcuts, stem, head
    replaced = [c for c in fast.choices if c.kernel != "dense"]
    assert {c.kernel for c in replaced} == {kernel, "condensed_xla"}
    assert {c.path for c in fast.choices} - {c.path for c in replaced} <= {
        c.path for c in fast.choices if c.reason == "dense mask"}  # ERK: only dense-mask layers run as written
    assert_same(fast, model, variables, x, **EVAL)


@pytest.mark.slow   # CI: the small ResNet below covers BatchNorm eval and residual adds
def test_resnet18_batchnorm_eval_equals_apply():
    model = ResNet(stage_sizes=(2, 2, 2, 2), block=BasicBlock, width=4)
    variables, masks, x = sparse_model(model, (16, 16, 3), ablate={"stage1_0/conv1": [2], "stage3_1/conv2": [0]})
    # every sparse layer condensed (no measurement): all the replaced calls, strides and paddings
    fast = sj.condense(model, variables, masks, example=x, apply_kwargs=EVAL,
                       kernels={"stem|conv|shortcut": "conv_patches_xla", "head": "condensed_xla"})
    assert len(fast.choices) == 21  # stem + 16 block convs + 3 shortcuts + head
    assert all(c.kernel != "dense" for c in fast.choices if c.reason != "dense mask")  # ERK: some dense
    assert {c.kernel for c in fast.choices} == {"conv_patches_xla", "condensed_xla", "dense"}
    assert_same(fast, model, variables, x, **EVAL)


def test_measured_choice_on_a_small_resnet():
    model = ResNet(stage_sizes=(1, 1), block=BasicBlock, width=4)
    variables, masks, x = sparse_model(model, (8, 8, 3), ablate={"stage1_0/conv1": [2]})
    fast = sj.condense(model, variables, masks, example=x, apply_kwargs=EVAL, timing=FAST_TIMING)
    measured = [c for c in fast.choices if c.times_us]
    assert measured and all("dense" in dict(c.times_us) for c in measured)
    conv1 = dict(next(c for c in fast.choices if c.path == "stage1_0/conv1").times_us)
    assert {"dense", "structured", "conv_patches_xla"} <= set(conv1)  # every kernel that applies was timed
    assert all(c.kernel in KERNELS for c in fast.choices)
    assert_same(fast, model, variables, x, **EVAL)


def test_measuring_shows_a_progress_bar_unless_asked_not_to(capsys):
    model = MLP(hidden=(48, 24))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    sj.condense(model, variables, masks, example=x, timing=FAST_TIMING)
    bar = capsys.readouterr().err
    assert "condense: timing kernels" in bar and "4/4" in bar, bar  # fc1, fc2, head, the whole-model check
    sj.condense(model, variables, masks, example=x, timing=FAST_TIMING, progress=False)
    sj.condense(model, variables, masks, kernels={".": "condensed_xla"})  # nothing measured: no bar
    assert "condense" not in capsys.readouterr().err


def test_small_vit_equals_apply():
    model = ViT(patch=4, dim=16, depth=2, num_heads=2, mlp_dim=32, num_classes=5)
    variables, masks, x = sparse_model(model, (8, 8, 3), ablate={"block0/mlp_fc1": [1, 2]},
                                       distribution="uniform_sparse")  # the paper's ViT setting
    fast = sj.condense(model, variables, masks, example=x,
                       kernels={"mlp_fc|attn/out|head": "condensed_xla", "patch_embed": "conv_patches_xla"})
    chosen = kinds(fast)
    assert chosen["block0/attn/query"] == "dense"  # attention in-projections stay dense (the default plan)
    assert chosen["block1/mlp_fc2"] == "condensed_xla" and chosen["patch_embed"] == "conv_patches_xla"
    assert_same(fast, model, variables, x)


def test_jit_of_the_object_and_pytree_argument():
    model = MLP(hidden=(32,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    fast = sj.condense(model, variables, masks, example=x, kernels={".": "condensed_xla"})
    want = model.apply(variables, x)
    np.testing.assert_allclose(jax.jit(fast)(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda f, x: f(x))(fast, x), want, rtol=1e-5, atol=1e-5)


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = SmallCNN(channels=(4, 8), hidden=8)
    variables, masks, x = sparse_model(model, (8, 8, 1), ablate={"fc1": [0]})
    fast = sj.condense(model, variables, masks, example=x,
                       kernels={"stem|conv": "conv_patches_xla", "fc1": "structured", "head": "condensed_xla"})
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "fast", fast.variables)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "fast", jax.tree.map(ocp.utils.to_shape_dtype_struct, fast.variables))
    again = fast.with_variables(restored)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(fast(x)))
    assert_same(again, model, variables, x)


def test_dense_general_over_trailing_axes():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(6, axis=(-2, -1), name="proj")(x)

    model = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 5)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    mask = np.zeros((4, 5, 6), bool)
    mask.reshape(20, 6)[:3] = True  # constant fan-in 3 over the flattened (4, 5) inputs
    masks = {"proj": {"kernel": jnp.asarray(mask), "bias": jnp.ones(6, bool)}}
    variables = {"params": {"proj": {"kernel": variables["params"]["proj"]["kernel"] * mask,
                                     "bias": variables["params"]["proj"]["bias"] + 0.5}}}
    # (4, 5, 6) could be a stacked Dense, a DenseGeneral or a 1-D conv: declared as in training, never guessed
    with pytest.raises(ValueError, match=r"'proj/kernel' with shape \(4, 5, 6\).*neuron_axes.*sj.condense"):
        sj.condense(model, variables, masks, example=x, kernels={".": "condensed_xla"})
    fast = sj.condense(model, variables, masks, example=x, kernels={".": "condensed_xla"}, neuron_axes={"proj": -1})
    assert kinds(fast) == {"proj": "condensed_xla"}
    assert_same(fast, model, variables, x)


# ---------------------------------------------------------------------------------------------- choice
def test_override_and_choice_table():
    model = MLP(hidden=(32, 16))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    fast = sj.condense(model, variables, masks, example=x, kernels={"fc1": "dense", "fc2|head": "auto"},
                       timing=FAST_TIMING, check_model=False)
    fc1 = next(c for c in fast.choices if c.path == "fc1")
    assert (fc1.kernel, fc1.reason) == ("dense", "kernels= override")
    assert set(fast.variables["params"]["fc1"]) == {"kernel", "bias"}   # run as written
    assert all(c.times_us for c in fast.choices if c.path != "fc1")
    table = fast.table()
    assert "fc1" in table and "kernels= override" in table
    assert_same(fast, model, variables, x)


def test_dense_and_non_constant_fan_in_layers_run_as_they_are():
    model = MLP(hidden=(16,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    rigl = sj.RigL(sparsity=0.8, t_end=10).init_masks(variables["params"], jax.random.key(5))  # varying fan-in
    masks = {**masks, "fc1": rigl["fc1"], "head": jax.tree.map(jnp.ones_like, masks["head"])}
    params = {**variables["params"], "fc1": {**variables["params"]["fc1"],
                                              "kernel": variables["params"]["fc1"]["kernel"] * rigl["fc1"]["kernel"]}}
    variables = {**variables, "params": params}
    fast = sj.condense(model, variables, masks, example=x, timing=FAST_TIMING)
    reasons = {c.path: (c.kernel, c.reason) for c in fast.choices}
    assert reasons == {"fc1": ("dense", "not constant fan-in"), "head": ("dense", "dense mask")}
    assert_same(fast, model, variables, x)


def test_weights_outside_the_mask_keep_the_layer_dense():
    model = MLP(hidden=(16,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    variables = _edit(variables, "params/fc1/kernel", lambda k: k + 1.0)
    fast = sj.condense(model, variables, masks, example=x, kernels={"head": "condensed_xla"})
    assert {c.path: c.reason for c in fast.choices}["fc1"] == "nonzero weights outside the mask"
    assert_same(fast, model, variables, x)


def test_without_example_a_fixed_rule():
    model = SmallCNN(channels=(4, 8), hidden=8)
    variables, masks, x = sparse_model(model, (8, 8, 1), ablate={"conv2": [1]})
    fast = sj.condense(model, variables, masks)
    chosen = kinds(fast)
    assert chosen["conv2"] == "structured" and chosen["stem"] == "dense"
    assert chosen["fc1"] == ("condensed_ffi" if _ffi_kernels.available() else "dense")
    assert all("fixed rule" in c.reason for c in fast.choices)
    assert_same(fast, model, variables, x)


def test_batch_size_sets_the_measured_shape():
    model = MLP(hidden=(16,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    fast = sj.condense(model, variables, masks, example=jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32),
                       batch_size=7, timing=FAST_TIMING, check_model=False)
    assert [c.input_shapes for c in fast.choices] == [((7, 16),), ((7, 16),)]  # fc1: 4*4*1 inputs; head: 16


# ---------------------------------------------------------------------------------------------- errors
def test_masks_tree_lacking_a_layer_names_the_tree_and_path():
    model = MLP(hidden=(16,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    del masks["head"]
    with pytest.raises(KeyError, match=r"masks tree lacks 'head/kernel'"):
        sj.condense(model, variables, masks, example=x)


def test_float_masks_are_an_error():
    model = MLP(hidden=(16,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    masks = jax.tree.map(lambda m: m.astype(jnp.float32) * 0.5, masks)
    with pytest.raises(ValueError, match="masks must be boolean"):
        sj.condense(model, variables, masks, example=x)


def test_vmapped_layer_needs_its_stack_declaration():
    class Stacked(nn.Module):  # a vmapped Dense: the params hold (2, in, out), the module sees (in, out)
        @nn.compact
        def __call__(self, x):
            dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                            out_axes=0, axis_size=2)
            return dense(4, name="stack")(x)

    model = Stacked()
    x = jnp.ones((3, 8))
    variables = model.init(jax.random.key(0), x)
    mask = np.zeros((2, 8, 4), bool)
    mask[0, :2, :3] = True    # slice 0: 3 active neurons, k' = 2
    mask[1, 3:6, 2:] = True   # slice 1: 2 active neurons, k' = 3 (both padded exactly to 3 and 3)
    masks = {"stack": {"kernel": jnp.asarray(mask), "bias": jnp.ones((2, 4), bool)}}
    variables = _edit(variables, "params/stack/kernel", lambda k: k * mask)
    with pytest.raises(ValueError, match=r"'stack/kernel' with shape \(2, 8, 4\).*stack_axes"):
        sj.condense(model, variables, masks, example=x)
    with pytest.raises(ValueError, match=r"'stack'.*cannot be matched to its mask.*stack_axes="):
        sj.condense(model, variables, masks, example=x, neuron_axes={"stack": -1})   # taken for a 1-D conv
    fast = sj.condense(model, variables, masks, example=x, kernels={"stack": "dense"})
    assert_same(fast, model, variables, x)
    for kernel in ["condensed_xla", "structured"] + (["condensed_ffi"] if _ffi_kernels.available() else []):
        fast = sj.condense(model, variables, masks, example=x, kernels={".": kernel}, stack_axes={"stack/": 0})
        choice = fast.choices[0]
        assert (choice.kernel, choice.n_slices, choice.fan_in, choice.n_active) == (kernel, 2, 3, 3)
        assert_same(fast, model, variables, x)


def test_bad_overrides_are_errors():
    model = MLP(hidden=(16,))
    variables, masks, x = sparse_model(model, (4, 4, 1))
    with pytest.raises(ValueError, match="unknown kernel 'fastest'"):
        sj.condense(model, variables, masks, example=x, kernels={".": "fastest"})
    with pytest.raises(ValueError, match="'fc1' cannot run 'structured': no ablated neurons"):
        sj.condense(model, variables, masks, example=x, kernels={"fc1": "structured"})
    with pytest.raises(ValueError, match="'fc1' cannot run 'conv_patches_xla'"):
        sj.condense(model, variables, masks, example=x, kernels={"fc1": "conv_patches_xla"})
    with pytest.raises(ValueError, match="matched by regexes naming different kernels"):
        sj.condense(model, variables, masks, example=x, kernels={"fc": "dense", "1": "condensed_xla"})


# ---------------------------------------------------------------------------------------------- NNX
class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding=1, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8 * 4 * 4, 24, rngs=rngs), nnx.Linear(24, 5, rngs=rngs)])

    def __call__(self, x):
        x = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.layers[1](nnx.relu(self.layers[0](x)))


@pytest.mark.parametrize("override", [None, {"conv": "conv_patches_xla", "layers": "condensed_xla"}])
def test_nnx_graph_surgery_equals_the_module(override):
    module = NNXNet(nnx.Rngs(0))
    algo = sj.SRigL(sparsity=0.9, t_end=10, ablation_exempt=(r"layers/1/kernel",))
    params = nnx.state(module, nnx.Param)
    masks = algo.init_masks(params, jax.random.key(1))
    nnx.update(module, algo.init_params(params, masks, jax.random.key(2)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    fast = sj.condense(module, masks, kernels=override)
    np.testing.assert_allclose(np.asarray(fast(x)), np.asarray(module(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(fast, x)), np.asarray(module(x)),
                               rtol=1e-5, atol=1e-5)
    assert isinstance(module.layers[0], nnx.Linear)  # the original is unchanged
    chosen = {c.path: c.kernel for c in fast.condense_choices}
    if override:
        assert chosen == {"conv": "conv_patches_xla", "layers/0": "condensed_xla", "layers/1": "condensed_xla"}
    replaced = [c.path for c in fast.condense_choices if c.kernel != "dense"]
    assert all(isinstance(fast.layers[int(p[-1])] if p.startswith("layers") else fast.conv, sj.inference.CondensedLayer)
               for p in replaced)


# ---------------------------------------------------------------------------------------------- stacked layers
def stacked_masks(shape, seed):
    """A (slices, fan_in, n) mask, constant fan-in per slice but with a different k' and a different set (and
    number) of ablated neurons in every slice."""
    n_slices, fan_in, n = shape
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for s in range(n_slices):
        k = 2 + s % 3
        ablated = rng.choice(n, size=1 + s % 3, replace=False)
        for j in sorted(set(range(n)) - set(ablated.tolist())):
            mask[s, rng.choice(fan_in, size=k, replace=False), j] = True
    return mask


def with_stacked_masks(params, masks, path, seed):
    """``params`` / ``masks`` with the stacked kernel at ``path`` replaced by :func:`stacked_masks` (weights zero
    outside) and nonzero biases."""
    kernel = np.asarray(get_path(params, f"{path}/kernel"))
    mask = stacked_masks(kernel.shape, seed)
    params = _edit(params, f"{path}/kernel", lambda k: k * mask)
    params = _edit(params, f"{path}/bias", lambda b: b + 0.1 * jnp.arange(b.size, dtype=b.dtype).reshape(b.shape))
    return params, _edit(masks, f"{path}/kernel", lambda _: jnp.asarray(mask))


def get_path(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


STACKED_KERNELS = ["structured", "condensed_xla", pytest.param("condensed_ffi", marks=FFI)]


@pytest.mark.parametrize("kernel", STACKED_KERNELS)
def test_scanned_linen_model_equals_apply(kernel):
    model = ScannedMLP()   # embed, nn.scan over 4 Dense (4, 32, 32) blocks, head
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    algo = sj.SRigL(sparsity=0.8, t_end=10, stack_axes={"blocks/": 0}, ablation_exempt=("head/",))
    masks = algo.init_masks(params, jax.random.key(1))
    params, masks = with_stacked_masks(algo.init_params(params, masks, jax.random.key(2)), masks,
                                       "blocks/Dense_0", seed=3)
    variables = {"params": params}
    fast = sj.condense(model, variables, masks, example=x, kernels={"blocks": kernel, "embed|head": "condensed_xla"},
                       stack_axes={"blocks/": 0})
    blocks = next(c for c in fast.choices if c.path == "blocks/Dense_0")
    assert (blocks.kernel, blocks.n_slices, blocks.fan_in, blocks.n_active, blocks.n_out, blocks.n_in) == (
        kernel, 4, 4, 31, 32, 32)   # k' 2, 3, 4, 2 and 31, 30, 29, 31 active neurons: padded to 4 and 31
    assert blocks.input_shapes == ((3, 32),)   # the scanned call's own input
    if kernel != "structured":
        assert fast.variables["params"]["blocks"]["Dense_0"]["values"].shape == (4, 31, 4)
    assert_same(fast, model, variables, x, eager=True)
    np.testing.assert_allclose(jax.jit(fast)(x), model.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_scanned_linen_model_trained_with_srigl_measured_and_fixed_rule():
    model, algo, _, params, opt_state = scanned_mlp_trained_with_srigl()
    masks = sj.get_masks(opt_state)
    params, masks = with_stacked_masks(params, masks, "blocks/Dense_0", seed=4)   # ablation differs per slice
    variables = {"params": params}
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 12)), jnp.float32)
    with pytest.raises(ValueError, match=r"'blocks/Dense_0/kernel' with shape \(4, 32, 32\).*stack_axes"):
        sj.condense(model, variables, masks, example=x)
    declared = dict(stack_axes=algo.stack_axes, neuron_axes=algo.neuron_axes)
    measured = sj.condense(model, variables, masks, example=x, timing=FAST_TIMING, **declared)
    assert dict(next(c for c in measured.choices if c.path == "blocks/Dense_0").times_us).keys() >= {
        "dense", "structured", "condensed_xla"}
    assert_same(measured, model, variables, x)
    fixed = sj.condense(model, variables, masks, **declared)   # no example: the fixed rule
    assert kinds(fixed)["blocks/Dense_0"] == ("condensed_ffi" if _ffi_kernels.available() else "structured")
    assert_same(fixed, model, variables, x)


@pytest.mark.parametrize("kernel", STACKED_KERNELS)
def test_scanned_nnx_model_equals_the_module(kernel):
    module = NNXStacked(nnx.Rngs(0))   # embed, nnx.vmap-made Linear (3, 16, 16) run by nnx.scan, head
    algo = sj.SRigL(sparsity=0.8, t_end=10, stack_axes={"blocks/": 0}, ablation_exempt=("head/",))
    params = nnx.state(module, nnx.Param)
    masks = algo.init_masks(params, jax.random.key(1))
    params, masks = with_stacked_masks(nnx.to_pure_dict(algo.init_params(params, masks, jax.random.key(2))),
                                       masks, "blocks", seed=5)
    nnx.update(module, params)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12)), jnp.float32)
    with pytest.raises(ValueError, match=r"'blocks/kernel' with shape \(3, 16, 16\).*stack_axes"):
        sj.condense(module, masks, kernels={"blocks": kernel})
    fast = sj.condense(module, masks, kernels={"blocks": kernel}, stack_axes=algo.stack_axes)
    blocks = next(c for c in fast.condense_choices if c.path == "blocks")
    assert (blocks.kernel, blocks.n_slices, blocks.fan_in, blocks.n_active) == (kernel, 3, 4, 15)
    assert isinstance(fast.blocks, sj.inference.CondensedLayer)
    want = np.asarray(module(x))
    np.testing.assert_allclose(np.asarray(fast(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(fast, x)), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(n_slices=st.integers(1, 4), fan_in=st.integers(4, 9), n=st.integers(3, 7), seed=st.integers(0, 10_000))
def test_pad_slices_is_exact(n_slices, fan_in, n, seed):
    mask = stacked_masks((n_slices, fan_in, n), seed)
    kernel = np.random.default_rng(seed).standard_normal(mask.shape).astype(np.float32)
    padded_kernel, padded = pad_slices(kernel, mask)
    counts = padded.sum(axis=1)
    assert len({int((c > 0).sum()) for c in counts}) == 1            # one active count for every slice
    assert len(set(counts[counts > 0].tolist())) == 1                 # one fan-in for every active neuron
    assert int((counts > 0).sum(axis=1).max()) == int((mask.sum(axis=1) > 0).sum(axis=1).max())
    assert int(counts.max()) == int(mask.sum(axis=1).max())
    assert np.all(padded >= mask) and np.array_equal(padded_kernel * padded, kernel * mask)   # weights unchanged


def test_export_condensed_stacked_and_neuron_axes():
    class CondensedBlock(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(CondensedDense(32, name="Dense_0")(h)), None

    class Exported(nn.Module):   # ScannedMLP with its scanned blocks condensed
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32, name="embed")(x))
            blocks = nn.scan(CondensedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
            x, _ = blocks(name="blocks")(x, None)
            return nn.Dense(5, name="head")(x)

    model = ScannedMLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 12)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    params, masks = with_stacked_masks(params, masks, "blocks/Dense_0", seed=6)
    with pytest.raises(ValueError, match=r"'blocks/Dense_0/kernel' with shape \(4, 32, 32\).*stack_axes"):
        export_condensed(params, masks)
    exported = export_condensed(params, masks, stack_axes={"blocks/": 0})
    assert exported["blocks"]["Dense_0"]["values"].shape == (4, 31, 4) and "kernel" in exported["embed"]
    np.testing.assert_allclose(Exported().apply({"params": exported}, x), model.apply({"params": params}, x),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slice 1.*not constant fan-in"):
        bad = np.asarray(masks["blocks"]["Dense_0"]["kernel"]).copy()
        bad[1, :, 0] = False
        bad[1, :5, 0] = True   # one neuron of slice 1 with 5 inputs
        export_condensed(params, _edit(masks, "blocks/Dense_0/kernel", lambda _: jnp.asarray(bad)),
                         stack_axes={"blocks/": 0})
    # neurons on several axes (a DenseGeneral in-projection (in, heads, head_dim)): one neuron per (head, dim)
    mask = np.zeros((8, 2, 3), bool)
    for j in range(6):
        mask.reshape(8, 6)[[j, (j + 3) % 8], j] = True
    kernel = np.random.default_rng(1).standard_normal(mask.shape).astype(np.float32) * mask
    out = export_condensed({"q": {"kernel": kernel}}, {"q": {"kernel": mask}}, neuron_axes={"q": (1, 2)})["q"]
    layer = CondensedLinear(out["values"], out["indices"], out["bias"], out["active"], 8, 6)
    np.testing.assert_array_equal(densify(layer), kernel.reshape(8, 6))


class WideScanned(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, name="embed")(x)
        block = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth)
        x, _ = block(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.relu(nn.Dense(h.shape[-1])(h)), None


@pytest.mark.slow   # CI: the scanned tests above
@settings(max_examples=8, deadline=None)
@given(width=st.integers(8, 96), depth=st.integers(1, 6), batch=st.sampled_from([1, 5, 64]),
       kernel=st.sampled_from(["structured", "condensed_xla", "condensed_ffi"]), seed=st.integers(0, 1000))
def test_scanned_models_of_any_shape_equal_apply(width, depth, batch, kernel, seed):
    if kernel == "condensed_ffi" and not _ffi_kernels.available():
        return
    model = WideScanned(width, depth)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, 7)), jnp.float32)
    params = model.init(jax.random.key(seed), x)["params"]
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    params, masks = with_stacked_masks(params, masks, "blocks/Dense_0", seed)
    fast = sj.condense(model, {"params": params}, masks, example=x, kernels={"blocks": kernel},
                       stack_axes={"blocks/": 0})
    assert kinds(fast)["blocks/Dense_0"] == kernel
    assert_same(fast, model, {"params": params}, x)


class ConvBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.relu(nn.Conv(6, (3, 3), name="conv")(h)), None


class ScannedCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="stem")(x)
        x, _ = nn.scan(ConvBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="blocks")(x, None)
        return x.mean(axis=(1, 2))


@pytest.mark.parametrize("kernel", ["structured", "conv_patches_xla", "conv_direct_xla",
                                    pytest.param("conv_direct_ffi", marks=FFI)])
def test_scanned_conv_blocks_equal_apply(kernel):
    model = ScannedCNN()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    kernel_5d = np.asarray(params["blocks"]["conv"]["kernel"])   # (3, 3, 3, 6, 6): stacked HWIO
    mask = stacked_masks((3, 54, 6), seed=7).reshape(kernel_5d.shape)   # constant fan-in over (kh, kw, in)
    params = _edit(params, "blocks/conv/kernel", lambda k: k * mask)
    masks = _edit(masks, "blocks/conv/kernel", lambda _: jnp.asarray(mask))
    # undeclared, the 5-D kernel could as well be a 3-D conv: an error naming it, never a guess
    with pytest.raises(ValueError, match=r"'blocks/conv/kernel' with shape \(3, 3, 3, 6, 6\).*stack_axes="):
        sj.condense(model, {"params": params}, masks, example=x, kernels={"blocks": kernel})
    fast = sj.condense(model, {"params": params}, masks, example=x, kernels={"blocks": kernel},
                       stack_axes={"blocks/": 0})
    assert kinds(fast)["blocks/conv"] == kernel
    assert_same(fast, model, {"params": params}, x)
