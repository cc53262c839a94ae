"""Flax linen models used by the paper's recipes, each with its sparsity declaration.

Why linen: the sparse core (srigl_jax) works on plain params pytrees; linen's ``variables["params"]`` is a
nested dict whose keys are the submodule names we choose here, so the path strings that sparsity filters
see ("block1_0/conv1/kernel", "head/kernel", ...) are stable, readable and independent of call order.

Every model names its classifier ``head`` and its first layer ``stem`` (CNNs) / ``fc1`` (MLP) /
``patch_embed`` (ViT), so the regexes in :class:`ModelSpec` stay short.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kaiming-normal (fan_out) is the torchvision ResNet init; the sparse core re-initialises sparse kernels anyway.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The ResNets' convolutions: no bias (a BatchNorm follows), He (fan-out) initialisation.
_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init)


class MLP(nn.Module):
    """ReLU MLP (default LeNet-300-100 shape) on flattened inputs."""

    hidden: Sequence[int] = (300, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv + max-pool stages and a hidden dense layer (MNIST-sized)."""

    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, ch in enumerate(self.channels):
            name = "stem" if i == 0 else f"conv{i + 1}"
            x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", name=name)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def _batch_norm(train: bool, name: str, zero_init: bool = False) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name,
                        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)


def _projected_shortcut(x: jax.Array, features: int, stride: int, train: bool) -> jax.Array:
    """x, or its 1x1-conv + BN projection ("shortcut", "shortcut_bn") when the block changes its shape.
    Called inside a block's compact ``__call__``, so the layers belong to that block."""
    if stride == 1 and x.shape[-1] == features:
        return x
    x = _conv(features, (1, 1), (stride, stride), name="shortcut")(x)
    return _batch_norm(train, "shortcut_bn")(x)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), projection shortcut when the shape changes."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = _conv(self.features, (3, 3), (self.stride, self.stride), padding=1, name="conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = _conv(self.features, (3, 3), padding=1, name="conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        return nn.relu(_projected_shortcut(x, self.features, self.stride, train) + y)


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (1x1, 3x3 with the stride (v1.5), 1x1 x4); last BN zero-initialised."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(_batch_norm(train, "bn1")(_conv(self.features, (1, 1), name="conv1")(x)))
        y = _conv(self.features, (3, 3), (self.stride, self.stride), padding=1, name="conv2")(y)
        y = nn.relu(_batch_norm(train, "bn2")(y))
        y = _batch_norm(train, "bn3", zero_init=True)(_conv(self.features * 4, (1, 1), name="conv3")(y))
        return nn.relu(_projected_shortcut(x, self.features * 4, self.stride, train) + y)


class ResNet(nn.Module):
    """ResNet. ``cifar_stem``: 3x3 stride-1 first conv and no max-pool (the CIFAR variant)."""

    stage_sizes: Sequence[int]
    block: Any = BasicBlock
    width: int = 64
    num_classes: int = 10
    cifar_stem: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.cifar_stem:
            x = _conv(self.width, (3, 3), padding=1, name="stem")(x)
        else:
            x = _conv(self.width, (7, 7), (2, 2), padding=3, name="stem")(x)
        x = nn.relu(_batch_norm(train, "stem_bn")(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, n_blocks in enumerate(self.stage_sizes):
            for b in range(n_blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = self.block(self.width * 2 ** stage, stride, name=f"stage{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (BN-ReLU-conv x2), projection shortcut on shape change."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pre = nn.relu(_batch_norm(train, "bn1")(x))
        y = _conv(self.features, (3, 3), (self.stride, self.stride), padding=1, name="conv1")(pre)
        y = nn.relu(_batch_norm(train, "bn2")(y))
        y = _conv(self.features, (3, 3), padding=1, name="conv2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:  # pre-activation: projects pre, no BN
            x = _conv(self.features, (1, 1), (self.stride, self.stride), name="shortcut")(pre)
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR (Zagoruyko & Komodakis): 3 groups of (depth-4)/6 blocks, widths 16k/32k/64k."""

    depth: int = 22
    widen: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        n_blocks = (self.depth - 4) // 6
        x = _conv(16, (3, 3), padding=1, name="stem")(x)
        for group, base in enumerate((16, 32, 64)):
            for b in range(n_blocks):
                stride = 2 if group > 0 and b == 0 else 1
                x = WideBlock(base * self.widen, stride, name=f"group{group + 1}_{b}")(x, train)
        x = nn.relu(_batch_norm(train, "final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate (in, out) Dense query/key/value/out projections.

    Plain 2-D Dense kernels (rather than DenseGeneral's 3-D ones) keep the core's layout convention:
    neuron = last axis, fan-in = axis 0.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        split = lambda t: t.reshape(b, n, self.num_heads, head_dim)
        q, k, v = (split(nn.Dense(d, name=nm)(x)) for nm in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, n, d)
        return nn.Dense(d, name="out")(out)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)); x + MLP(LN(x)) with GELU."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + SelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="ln1")(x))
        y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_fc1")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(x.shape[-1], name="mlp_fc2")(y)


class ViT(nn.Module):
    """Vision Transformer (ViT-B/16 by default): conv patch embedding, class token, learned positions."""

    patch: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.dim, (self.patch, self.patch), (self.patch, self.patch), padding="VALID",
                    name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d))
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.zeros)(x[:, 0])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model constructor plus what the sparse algorithm must know about it.

    first_layer: regex of the first layer (kept dense when the recipe's ``dense_first_layer`` is set).
    dense_paths: regexes (matched against path strings such as "stem/kernel") of layers always kept dense.
    ablation_exempt: regexes of sparse layers whose neurons may never be ablated (always the classifier).
    input_shape: one example's shape (H, W, C) as fed to the model.
    """

    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    first_layer: str = r"^stem/kernel$"
    dense_paths: tuple[str, ...] = ()
    ablation_exempt: tuple[str, ...] = (r"^head/kernel$",)
    has_batch_stats: bool = False


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, (28, 28, 1), 10, first_layer=r"^fc1/kernel$"),
    "cnn": ModelSpec(SmallCNN, (28, 28, 1), 10),
    "resnet18": ModelSpec(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock, cifar_stem=True),
                          (32, 32, 3), 10, has_batch_stats=True),
    "wrn22": ModelSpec(functools.partial(WideResNet, depth=22), (32, 32, 3), 10,
                       has_batch_stats=True),
    "resnet50": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck,
                                            cifar_stem=False, num_classes=1000),
                          (224, 224, 3), 1000, has_batch_stats=True),
    # ViT: attention in-projections (query/key/value) always stay dense, as in the paper.
    "vit_b16": ModelSpec(ViT, (224, 224, 3), 1000, first_layer=r"^patch_embed/kernel$",
                         dense_paths=(r"/attn/(query|key|value)/kernel$",)),
}


def get_model_spec(name: str) -> ModelSpec:
    """Look up a model by name, with a clear error listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int | None = None, **kwargs: Any) -> tuple[nn.Module, ModelSpec]:
    """Instantiate model ``name`` (extra kwargs override the constructor defaults, e.g. width=16)."""
    spec = get_model_spec(name)
    n_cls = spec.num_classes if num_classes is None else num_classes
    return spec.build(num_classes=n_cls, **kwargs), spec


def init_variables(model: nn.Module, input_shape: Sequence[int], key: jax.Array) -> dict[str, Any]:
    """Initialise the model's variables on a batch of 2 dummy examples (train mode, so batch_stats exist)."""
    x = jnp.zeros((2, *input_shape), jnp.float32)
    return model.init({"params": key}, x, train=False)
