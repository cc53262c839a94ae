"""Condensed and structured inference for constant fan-in sparse layers.

Two exports of a trained SRigL model (see the README, "Condensed inference"):

* :func:`export_structured` drops ablated neurons (all-False mask columns) and the matching input rows of the
  next layer, folding the dropped neurons' constant output ``act(bias)`` into the next layer's bias. The result
  is a smaller *dense* model (runs anywhere, at dense speed on the smaller shapes).
* :func:`export_condensed` stores every constant fan-in layer as ``values`` (n_active, k) and ``indices``
  (n_active, k): ``y[b, active[n]] = sum_j values[n, j] * x[b, indices[n, j]] + bias[active[n]]``.
  :func:`condensed_linear` runs that product with a C++ XLA FFI kernel on CPU when it is built, else with a
  portable pure-XLA gather-multiply (CPU and GPU).

Exports are built outside ``jit`` (their shapes depend on the mask values); the ops that run them are jit-able.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from srigl_jax.paths import natural_key

Array = jax.Array
Params = dict[str, Any]

# int16 indices halve the index traffic; they address inputs 0..32767.
_INT16_MAX_FAN_IN = int(np.iinfo(np.int16).max) + 1
# Batch size from which the XLA path switches from the per-sample gather to the transposed row gather.
_XLA_ROWS_FROM_BATCH = 4
FORCE_XLA_ENV = "SRIGL_JAX_CONDENSED_FORCE_XLA"


# --------------------------------------------------------------------------------------------------------------
# Condensed representation
# --------------------------------------------------------------------------------------------------------------
@struct.dataclass
class CondensedLinear:
    """One constant fan-in layer in condensed form (a pytree; the int fields are static).

    ``values[n, j]`` multiplies input ``indices[n, j]`` for output neuron ``active[n]``; outputs of neurons not in
    ``active`` (ablated) are ``bias`` alone. ``bias`` has the full output width ``out_features``.
    """

    values: Array  # (n_active, k) float
    indices: Array  # (n_active, k) int16 if in_features <= 32768 else int32
    bias: Array  # (out_features,) float (zeros when the layer has no bias)
    active: Array  # (n_active,) int32, increasing: original index of each kept neuron
    in_features: int = struct.field(pytree_node=False)
    out_features: int = struct.field(pytree_node=False)

    @property
    def fan_in(self) -> int:
        """k': the number of inputs of every active neuron."""
        return int(self.values.shape[1])

    @property
    def n_active(self) -> int:
        return int(self.values.shape[0])


def index_dtype_for(in_features: int) -> np.dtype:
    """The narrowest supported index dtype for a layer with ``in_features`` inputs (int16 or int32)."""
    return np.dtype(np.int16) if in_features <= _INT16_MAX_FAN_IN else np.dtype(np.int32)


def constant_fan_in(mask: np.ndarray, name: str = "layer", pad: bool = False) -> tuple[np.ndarray, int]:
    """Validate a 2-D (in, out) mask and return (active neuron indices, k').

    Raises ValueError if the active neurons (columns with any True) do not all have the same number of inputs,
    unless ``pad`` (then k' = the largest fan-in).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (in, out) mask, got shape {mask.shape}")
    counts = mask.sum(axis=0)
    active = np.flatnonzero(counts > 0).astype(np.int32)
    fan_ins = np.unique(counts[active])
    if fan_ins.size > 1 and not pad:
        raise ValueError(
            f"{name}: mask is not constant fan-in: active neurons have {fan_ins.size} different fan-ins "
            f"(min {fan_ins.min()}, max {fan_ins.max()}); condensed export needs every non-ablated neuron to "
            "have exactly k' inputs (an SRigL mask, not RigL/SET/dense-masked). After export_structured, "
            "pass pad_fan_in=True (inputs from removed neurons were dropped).")
    return active, int(fan_ins.max()) if fan_ins.size else 0


def condense_kernel(kernel: Array, mask: Array, bias: Array | None = None, name: str = "layer",
                    pad_fan_in: bool = False) -> CondensedLinear:
    """Condense one Dense-layout kernel (in, out) with its constant fan-in mask (host-side, not jit-able).

    ``pad_fan_in``: accept a varying fan-in by padding every neuron to the largest one with zero weights.
    """
    kernel = np.asarray(kernel)
    mask = np.asarray(mask, dtype=bool)
    if kernel.shape != mask.shape:
        raise ValueError(f"{name}: kernel shape {kernel.shape} != mask shape {mask.shape}")
    active, k = constant_fan_in(mask, name, pad_fan_in)
    n_in, n_out = kernel.shape
    mask_t = mask.T[active]  # (n_active, in)
    # A stable sort puts each neuron's active inputs first, in increasing order; padding (if any) follows
    # and carries weight 0 because the kernel is multiplied by its mask.
    indices = np.argsort(~mask_t, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis((kernel * mask).T[active], indices, axis=1)
    bias_full = np.zeros(n_out, kernel.dtype) if bias is None else np.asarray(bias)
    if bias_full.shape != (n_out,):
        raise ValueError(f"{name}: bias shape {bias_full.shape} != ({n_out},)")
    return CondensedLinear(
        values=jnp.asarray(values),
        indices=jnp.asarray(indices.astype(index_dtype_for(n_in))),
        bias=jnp.asarray(bias_full),
        active=jnp.asarray(active),
        in_features=int(n_in),
        out_features=int(n_out),
    )


def densify(layer: CondensedLinear) -> Array:
    """The (in, out) dense kernel a condensed layer represents (for checks and debugging)."""
    kernel = jnp.zeros((layer.in_features, layer.out_features), layer.values.dtype)
    cols = jnp.broadcast_to(layer.active[:, None], layer.indices.shape)
    return kernel.at[layer.indices.astype(jnp.int32), cols].set(layer.values)


# --------------------------------------------------------------------------------------------------------------
# The condensed product
# --------------------------------------------------------------------------------------------------------------
def _xla_gather_dot(x: Array, values: Array, indices: Array) -> Array:
    """(B, in) -> (B, n_active): per-sample gather then a row-wise dot. Best for tiny batches."""
    gathered = jnp.take(x, indices.astype(jnp.int32), axis=1)  # (B, n_active, k)
    return jnp.einsum("bnk,nk->bn", gathered, values)


def _xla_row_gather(x: Array, values: Array, indices: Array) -> Array:
    """(B, in) -> (B, n_active): loop over the k inputs of every neuron, gathering whole rows of x^T.

    Each step gathers n_active contiguous batch rows of x^T, so memory stays O(n_active * B) and the
    multiply-add vectorises along the batch.
    """
    x_t = x.T  # (in, B)
    idx = indices.astype(jnp.int32)

    def step(j, acc):
        return acc + values[:, j, None] * jnp.take(x_t, idx[:, j], axis=0)

    acc = jnp.zeros((values.shape[0], x.shape[0]), jnp.result_type(x, values))
    return jax.lax.fori_loop(0, values.shape[1], step, acc, unroll=4).T


def condensed_matmul_xla(x: Array, values: Array, indices: Array) -> Array:
    """Pure-XLA condensed product (B, in) -> (B, n_active); the formulation is chosen from the static batch."""
    if x.shape[0] < _XLA_ROWS_FROM_BATCH:
        return _xla_gather_dot(x, values, indices)
    return _xla_row_gather(x, values, indices)


def _scatter_active(y_active: Array, layer: CondensedLinear) -> Array:
    """Full-width output: active neurons from y_active, ablated neurons at their bias."""
    bias = layer.bias.astype(y_active.dtype)
    if layer.n_active == layer.out_features:
        return y_active + bias  # ``active`` is arange(out) here (sorted, all neurons)
    full = jnp.broadcast_to(bias, (y_active.shape[0], layer.out_features))
    return full.at[:, layer.active].add(y_active)


def use_ffi_kernel(x: Array, layer: CondensedLinear) -> bool:
    """True when the C++ kernel is built, not disabled, and supports these dtypes on this backend."""
    from srigl_jax import _ffi_kernels

    if os.environ.get(FORCE_XLA_ENV, "") not in ("", "0"):
        return False
    return _ffi_kernels.supports(x, layer.values, layer.indices)


def condensed_linear(x: Array, layer: CondensedLinear, *, backend: str = "auto") -> Array:
    """y = x @ W_masked + bias for a condensed layer; x (..., in) -> (..., out).

    backend: "auto" (the FFI kernel on CPU when available, else XLA), "xla", or "ffi" (error if unavailable).
    Set the environment variable SRIGL_JAX_CONDENSED_FORCE_XLA=1 to make "auto" use XLA.
    """
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"condensed_linear: x has {x.shape[-1]} features, layer expects {layer.in_features}")
    if backend not in ("auto", "xla", "ffi"):
        raise ValueError(f"backend must be 'auto', 'xla' or 'ffi', got {backend!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), layer.in_features)  # not -1: in_features may be 0
    if backend == "ffi" or (backend == "auto" and use_ffi_kernel(x2, layer)):
        from srigl_jax import _ffi_kernels

        y = _ffi_kernels.condensed_matmul_ffi(x2, layer.values, layer.indices, layer.bias, layer.active,
                                              layer.out_features)
    else:
        y = _scatter_active(condensed_matmul_xla(x2, layer.values, layer.indices), layer)
    return y.reshape(*lead, layer.out_features)


# --------------------------------------------------------------------------------------------------------------
# Convolution through patches
# --------------------------------------------------------------------------------------------------------------
def _same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def extract_patches(x: Array, window: tuple[int, int], strides: tuple[int, int] = (1, 1),
                    padding: str = "SAME") -> Array:
    """NHWC image -> (N, H', W', kh*kw*C) patches flattened in the (kh, kw, C) order of a Flax HWIO kernel."""
    kh, kw = window
    sh, sw = strides
    if padding == "SAME":
        pads = [_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)]
    elif padding == "VALID":
        pads = [(0, 0), (0, 0)]
    else:
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    out_h = (xp.shape[1] - kh) // sh + 1
    out_w = (xp.shape[2] - kw) // sw + 1
    taps = [xp[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.stack(taps, axis=3)  # (N, H', W', kh*kw, C)
    return patches.reshape(*patches.shape[:3], kh * kw * x.shape[3])


def condensed_conv(x: Array, layer: CondensedLinear, window: tuple[int, int], strides: tuple[int, int] = (1, 1),
                   padding: str = "SAME", *, backend: str = "auto") -> Array:
    """A 2-D NHWC convolution with a condensed (kh*kw*in -> out) kernel: patches, then condensed_linear."""
    return condensed_linear(extract_patches(x, window, strides, padding), layer, backend=backend)


# --------------------------------------------------------------------------------------------------------------
# Flax modules
# --------------------------------------------------------------------------------------------------------------
def condensed_variables(layer: CondensedLinear) -> dict[str, Array]:
    """The parameter dict of a :class:`CondensedDense` / :class:`CondensedConv` holding ``layer``."""
    return {"values": layer.values, "indices": layer.indices, "bias": layer.bias, "active": layer.active}


class CondensedDense(nn.Module):
    """Dense layer stored in condensed form: params {values, indices, bias, active} from :func:`export_condensed`.

    Shapes come from the params it is applied with (a structured export may have changed the widths), so
    ``features`` (output width), ``fan_in`` and ``n_active`` only shape a fresh ``init`` (zero weights).
    """

    features: int
    fan_in: int | None = None
    n_active: int | None = None
    backend: str = "auto"

    def _layer(self, in_features: int) -> CondensedLinear:
        k = self.fan_in or in_features
        n_act = self.n_active or self.features
        dtype = index_dtype_for(in_features)
        # self.variable (not self.param): no check against these init shapes when applied with exported params
        values = self.variable("params", "values", lambda: jnp.zeros((n_act, k), jnp.float32)).value
        indices = self.variable("params", "indices", lambda: jnp.zeros((n_act, k), dtype)).value
        bias = self.variable("params", "bias", lambda: jnp.zeros((self.features,), jnp.float32)).value
        active = self.variable("params", "active", lambda: jnp.arange(n_act, dtype=jnp.int32)).value
        return CondensedLinear(values, indices, bias, active, in_features, int(bias.shape[0]))

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return condensed_linear(x, self._layer(x.shape[-1]), backend=self.backend)


class CondensedConv(CondensedDense):
    """2-D NHWC convolution stored in condensed form (patches + condensed product); params as CondensedDense."""

    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        patch_features = self.kernel_size[0] * self.kernel_size[1] * x.shape[-1]
        return condensed_conv(x, self._layer(patch_features), tuple(self.kernel_size), tuple(self.strides),
                              self.padding, backend=self.backend)


# --------------------------------------------------------------------------------------------------------------
# Tree helpers
# --------------------------------------------------------------------------------------------------------------
def _get(tree: Params, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"no entry {path!r} in the params tree (missing {part!r})")
        node = node[part]
    return node


def _set(tree: Params, path: str, value: Any) -> Params:
    """A copy of the nested dict ``tree`` with ``path`` replaced (only the dicts on the path are copied)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set(tree[head], rest, value) if rest else value
    return out


def _as_plain_dict(tree: Any) -> Params:
    """Flax FrozenDict / nested mappings -> nested plain dicts (leaves untouched)."""
    if hasattr(tree, "items"):
        return {k: _as_plain_dict(v) for k, v in tree.items()}
    return tree


def _kernel_layers(params: Params, prefix: str = "") -> list[str]:
    """Paths of every sub-dict that holds a 'kernel' leaf."""
    found = []
    for key, value in params.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            if "kernel" in value and not hasattr(value["kernel"], "items"):
                found.append(path)
            found.extend(_kernel_layers(value, path + "/"))
    return found


def default_layer_order(params: Params) -> list[str]:
    """Layers (dicts holding a 'kernel') in natural sort order: 'Dense_2' before 'Dense_10'.

    Right for Flax MLPs/CNNs built with auto-named layers applied in creation order; pass an explicit
    order for anything else (named layers, branches, layers re-used in a different order).
    """
    return sorted(_kernel_layers(_as_plain_dict(params)), key=natural_key)


# --------------------------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------------------------
def _as_2d(kernel: np.ndarray) -> np.ndarray:
    """Dense (in, out) or conv (kh, kw, in, out) -> (fan_in, out)."""
    return kernel.reshape(-1, kernel.shape[-1])


def export_condensed(params: Params, masks: Params, layers: Sequence[str] | None = None,
                     condense_dense_layers: bool = False, pad_fan_in: bool = False) -> Params:
    """Replace each constant fan-in layer's {kernel, bias} by condensed {values, indices, bias, active}.

    ``layers``: paths of the layers to condense (default: every dict holding a 'kernel'; layers whose mask
    is all True are kept dense unless ``condense_dense_layers``). Other params pass through. Conv kernels
    (kh, kw, in, out) are condensed over their kh*kw*in fan-in (run them with :class:`CondensedConv`).
    Raises ValueError naming the layer if a mask is not constant fan-in, unless ``pad_fan_in`` (needed after
    :func:`export_structured`, which drops inputs from removed neurons: fan-ins then differ; shorter neurons
    are padded with zero weights). Host-side (not jit-able).
    """
    params, masks = _as_plain_dict(params), _as_plain_dict(masks)
    out = params
    for path in (default_layer_order(params) if layers is None else layers):
        kernel = np.asarray(_get(params, f"{path}/kernel"))
        mask = np.asarray(_get(masks, f"{path}/kernel"), dtype=bool)
        if mask.all() and not condense_dense_layers:
            continue
        layer_params = _get(params, path)
        cond = condense_kernel(_as_2d(kernel), _as_2d(mask), layer_params.get("bias"), name=path,
                               pad_fan_in=pad_fan_in)
        out = _set(out, path, condensed_variables(cond))
    return out


def _fold_removed_inputs(next_kernel: np.ndarray, next_bias: np.ndarray, removed: np.ndarray,
                         removed_out: np.ndarray, n_prev: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the inputs of ``next_kernel`` fed by removed neurons, adding their constant contribution to the bias.

    next_kernel: Dense (in, out) or conv (kh, kw, in, out). ``in`` may be n_prev (direct) or S * n_prev
    (the previous layer's NHWC map flattened, channel fastest). removed_out: act(bias) of the removed neurons.
    """
    if next_kernel.ndim == 4:  # conv: every tap sees the constant map (exact with VALID or act(bias) == 0)
        contribution = np.einsum("r,hwro->o", removed_out, next_kernel[:, :, removed, :])
        return np.delete(next_kernel, removed, axis=2), next_bias + contribution
    n_in = next_kernel.shape[0]
    if n_in % n_prev:
        raise ValueError(f"next layer has {n_in} inputs, not a multiple of the previous layer's {n_prev} neurons")
    spatial = n_in // n_prev
    k3 = next_kernel.reshape(spatial, n_prev, -1)  # flatten of (..., C) puts the channel fastest
    contribution = np.einsum("r,sro->o", removed_out, k3[:, removed, :])
    kept = np.delete(k3, removed, axis=1).reshape(-1, next_kernel.shape[1])
    return kept, next_bias + contribution


def export_structured(params: Params, masks: Params, layer_order: Sequence[str] | None = None, *,
                      activation: Callable[[Array], Array] = jax.nn.relu, conv_padding: str = "SAME",
                      ) -> tuple[Params, Params]:
    """Remove ablated neurons of a sequential net and return a smaller (params, masks) pair.

    For every layer but the last in ``layer_order`` (default :func:`default_layer_order`), output neurons whose
    mask column is all False are removed together with the next layer's matching inputs; their constant output
    ``activation(bias)`` times those input weights is folded into the next layer's bias. Kernels are multiplied
    by their masks. The last layer keeps all its outputs (the model's output width does not change).

    Exact when the net is ``layer_order[i] -> activation -> (max/avg pooling, flatten) -> layer_order[i+1]``.
    Not supported (wrong results): normalisation or residual/branching between listed layers. Conv -> conv with
    'SAME' padding is exact only if the removed channels' activation(bias) is 0 (the zero border would differ
    from the constant); otherwise a ValueError says so (pass conv_padding="VALID" if the convs are VALID).
    Host-side (not jit-able); returns plain nested dicts.
    """
    params, masks = _as_plain_dict(params), _as_plain_dict(masks)
    order = list(default_layer_order(params) if layer_order is None else layer_order)
    if len(order) < 1:
        raise ValueError("export_structured: no layers (dicts holding a 'kernel') found")
    kernels = {p: np.asarray(_get(params, f"{p}/kernel")) * np.asarray(_get(masks, f"{p}/kernel"), bool)
               for p in order}
    layer_masks = {p: np.asarray(_get(masks, f"{p}/kernel"), bool) for p in order}
    biases = {p: (np.asarray(_get(params, p)["bias"]) if "bias" in _get(params, p)
                  else np.zeros(kernels[p].shape[-1], kernels[p].dtype)) for p in order}
    for path, nxt in zip(order[:-1], order[1:]):
        alive = _as_2d(layer_masks[path]).any(axis=0)
        removed = np.flatnonzero(~alive)
        if removed.size == 0:
            continue
        if removed.size == alive.size:
            raise ValueError(f"{path}: every neuron is ablated; the next layer sees a constant input")
        removed_out = np.asarray(activation(jnp.asarray(biases[path][removed])))
        if kernels[nxt].ndim == 4 and kernels[path].ndim == 4 and conv_padding != "VALID" \
                and np.any(removed_out != 0):
            raise ValueError(
                f"{path} -> {nxt}: removed channels have nonzero activation(bias) and the next conv pads with "
                "zeros ('SAME'): folding into the bias would be inexact at the borders. Keep these channels "
                "(no structured export) or use conv_padding='VALID' if the convs really are VALID.")
        n_prev = kernels[path].shape[-1]
        kernels[nxt], biases[nxt] = _fold_removed_inputs(kernels[nxt], biases[nxt], removed, removed_out, n_prev)
        mask_nxt = layer_masks[nxt]
        layer_masks[nxt], _ = _fold_removed_inputs(mask_nxt, np.zeros(mask_nxt.shape[-1]), removed,
                                                   np.zeros(removed.size), n_prev)
        layer_masks[nxt] = layer_masks[nxt].astype(bool)
        kernels[path] = kernels[path][..., alive]
        layer_masks[path] = layer_masks[path][..., alive]
        biases[path] = biases[path][alive]
    out_params, out_masks = params, masks
    for p in order:
        has_bias = "bias" in _get(params, p)
        out_params = _set(out_params, f"{p}/kernel", jnp.asarray(kernels[p]))
        out_masks = _set(out_masks, f"{p}/kernel", jnp.asarray(layer_masks[p]))
        if has_bias:
            out_params = _set(out_params, f"{p}/bias", jnp.asarray(biases[p], kernels[p].dtype))
            out_masks = _set(out_masks, f"{p}/bias", jnp.ones(biases[p].shape, bool))
        elif np.any(biases[p] != 0):
            raise ValueError(f"{p}: has no bias to absorb the removed neurons' constant output")
    return out_params, out_masks
