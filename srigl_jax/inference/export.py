"""Exports of a trained constant fan-in model (see the README, "Condensed inference"); host-side, not jit-able.

* :func:`export_structured` drops ablated neurons (all-False mask columns) and the matching input rows of the
  next layer, folding the dropped neurons' constant output ``act(bias)`` into the next layer's bias. The result
  is a smaller *dense* model (runs anywhere, at dense speed on the smaller shapes).
* :func:`export_condensed` stores every constant fan-in layer as ``values`` (n_active, k) and ``indices``
  (n_active, k) (:class:`~srigl_jax.inference.ops.CondensedLinear`), run by
  :func:`~srigl_jax.inference.dispatch.condensed_linear` or the modules in :mod:`srigl_jax.inference.modules`.

Exports are built outside ``jit`` (their shapes depend on the mask values); the ops that run them are jit-able.
Masks must be boolean (a float mask such as 0.5 is an error, never read as True).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.inference.layers import (as_matrix, as_plain_dict, kernel_layers, layer_layouts, map_slices,
                                        module_layout_problem)
from srigl_jax.inference.ops import CondensedLinear, index_dtype_for
from srigl_jax.layout import Axes
from srigl_jax.paths import natural_key

Array = jax.Array
Params = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
# Trees and masks
# --------------------------------------------------------------------------------------------------------------
def get_path(tree: Params, path: str, tree_name: str = "params") -> Any:
    """The entry at '/'-joined ``path``; KeyError naming ``tree_name`` and the missing part if absent.

    >>> get_path({"a": {"kernel": 1}}, "a/kernel")
    1
    """
    node = tree
    for part in path.split("/"):
        if not hasattr(node, "items") or part not in node:
            raise KeyError(f"the {tree_name} tree lacks {path!r} (no {part!r})")
        node = node[part]
    return node


def set_path(tree: Params, path: str, value: Any) -> Params:
    """A copy of the nested dict ``tree`` with ``path`` set (only the dicts on the path are copied; missing ones
    are created).

    >>> set_path({"a": {"b": 1}}, "a/c/d", 2)
    {'a': {'b': 1, 'c': {'d': 2}}}
    """
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = set_path(tree.get(head, {}), rest, value) if rest else value
    return out


def check_bool_mask(mask: Any, name: str) -> np.ndarray:
    """``mask`` as a numpy bool array; ValueError if it is not boolean (e.g. float 0.5 or int 0/1 masks).

    >>> check_bool_mask(np.array([True, False]), "m").tolist()
    [True, False]
    """
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise ValueError(
            f"{name}: masks must be boolean, got dtype {arr.dtype} (a float mask such as 0.5 is not read as True; "
            "convert an exact 0/1 mask with mask.astype(bool))")
    return arr


def layer_mask(masks: Params, path: str) -> np.ndarray:
    """The boolean kernel mask of layer ``path``; errors name the masks tree and the missing path."""
    return check_bool_mask(get_path(masks, f"{path}/kernel", "masks"), f"masks {path}/kernel")


def default_layer_order(params: Params) -> list[str]:
    """Layers (dicts holding a 'kernel') in natural sort order: 'Dense_2' before 'Dense_10'.

    Right for Flax MLPs/CNNs built with auto-named layers applied in creation order; pass an explicit
    order for anything else (named layers, branches, layers re-used in a different order).

    >>> default_layer_order({"Dense_10": {"kernel": 0}, "Dense_2": {"kernel": 0}})
    ['Dense_2', 'Dense_10']
    """
    return sorted(kernel_layers(as_plain_dict(params)), key=natural_key)


# --------------------------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------------------------
def constant_fan_in(mask: np.ndarray, name: str = "layer", pad: bool = False) -> tuple[np.ndarray, int]:
    """Validate a 2-D (in, out) mask and return (active neuron indices, k').

    Raises ValueError if the active neurons (columns with any True) do not all have the same number of inputs,
    unless ``pad`` (then k' = the largest fan-in).
    """
    mask = check_bool_mask(mask, name)
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
    mask = check_bool_mask(mask, name)
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


def condensed_variables(layer: CondensedLinear) -> dict[str, Array]:
    """The parameter dict of a :class:`CondensedDense` / :class:`CondensedConv` holding ``layer``."""
    return {"values": layer.values, "indices": layer.indices, "bias": layer.bias, "active": layer.active}


# --------------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------------
def export_condensed(params: Params, masks: Params, layers: Sequence[str] | None = None,
                     condense_dense_layers: bool = False, pad_fan_in: bool = False, *,
                     stack_axes: Mapping[str, Axes] | None = None, neuron_axes: Mapping[str, Axes] | None = None,
                     ) -> Params:
    """Replace each constant fan-in layer's {kernel, bias} by condensed {values, indices, bias, active}.

    ``layers``: paths of the layers to condense (default: every dict holding a 'kernel'; layers whose mask
    is all True are kept dense unless ``condense_dense_layers``). Other params pass through. Each layer is
    viewed through its :class:`~srigl_jax.layout.Layout` (``stack_axes`` / ``neuron_axes``: the declarations
    given to training, :func:`srigl_jax.inference.layers.layer_layouts`): a layer's neurons are its neuron axes
    (row-major), its fan-in the other axes (a Conv kernel (kh, kw, in, out) is condensed over kh*kw*in: run it
    with :class:`CondensedConv`). A stacked layer (``nn.scan``) gets every variable with the stack axes leading,
    (S, n_active, k) etc., each slice condensed on its own and padded exactly to the largest slice
    (:func:`~srigl_jax.inference.layers.pad_slices`), so ``nn.scan`` slices it as it sliced the kernel.
    Raises ValueError naming the layer (and slice) if a mask is not constant fan-in, unless ``pad_fan_in``
    (needed after :func:`export_structured`, which drops inputs from removed neurons: fan-ins then differ;
    shorter neurons are padded with zero weights), and for a kernel whose layout is ambiguous (declare it);
    KeyError naming the tree (params or masks) that lacks a layer.
    """
    params, masks = as_plain_dict(params), as_plain_dict(masks)
    order = list(default_layer_order(params) if layers is None else layers)
    kernels = {p: np.asarray(get_path(params, f"{p}/kernel", "params")) for p in order}
    layer_masks = {p: layer_mask(masks, p) for p in order}
    for p in order:
        if layer_masks[p].shape != kernels[p].shape:
            raise ValueError(f"{p}: kernel shape {kernels[p].shape} != mask shape {layer_masks[p].shape}")
    kept = {p for p in order if layer_masks[p].all() and not condense_dense_layers}
    layouts = layer_layouts({p: kernels[p].shape for p in order}, stack_axes=stack_axes, neuron_axes=neuron_axes,
                            lenient=kept)
    out = params
    for path in order:
        if path in kept:
            continue
        layout = layouts[path]
        mask_slices = layout.to_slices(layer_masks[path])
        for s in range(layout.n_slices):
            constant_fan_in(mask_slices[s], path if layout.n_slices == 1 else f"{path} slice {s}", pad_fan_in)

        def one(kernel, mask, bias, path=path):
            return condensed_variables(condense_kernel(kernel, mask, bias, name=path, pad_fan_in=pad_fan_in))

        variables = map_slices(layout, kernels[path], layer_masks[path], get_path(params, path).get("bias"), path,
                               one)
        out = set_path(out, path, {k: jnp.asarray(v) for k, v in variables.items()})
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
                      neuron_axes: Mapping[str, Axes] | None = None) -> tuple[Params, Params]:
    """Remove ablated neurons of a sequential net and return a smaller (params, masks) pair.

    For every layer but the last in ``layer_order`` (default :func:`default_layer_order`), output neurons whose
    mask column is all False are removed together with the next layer's matching inputs; their constant output
    ``activation(bias)`` times those input weights is folded into the next layer's bias. Kernels are multiplied
    by their masks. The last layer keeps all its outputs (the model's output width does not change).

    Exact when the net is ``layer_order[i] -> activation -> (max/avg pooling, flatten) -> layer_order[i+1]``.
    Not supported (wrong results): normalisation or residual/branching between listed layers. Conv -> conv with
    'SAME' padding is exact only if the removed channels' activation(bias) is 0 (the zero border would differ
    from the constant); otherwise a ValueError says so (pass conv_padding="VALID" if the convs are VALID).
    Layers must be unstacked with their neurons on the last axis (their :class:`~srigl_jax.layout.Layout`;
    ``neuron_axes`` declares an ambiguous 3-D kernel, e.g. ``{"proj": -1}``); anything else is a ValueError.
    Host-side (not jit-able); returns plain nested dicts.
    """
    params, masks = as_plain_dict(params), as_plain_dict(masks)
    order = list(default_layer_order(params) if layer_order is None else layer_order)
    if len(order) < 1:
        raise ValueError("export_structured: no layers (dicts holding a 'kernel') found")
    layer_masks = {p: layer_mask(masks, p) for p in order}
    layouts = layer_layouts({p: layer_masks[p].shape for p in order}, neuron_axes=neuron_axes)
    for p, layout in layouts.items():
        problem = module_layout_problem(layout) or (f"it is stacked ({layout.n_slices} slices)"
                                                    if layout.stack_axes else "")
        if problem:
            raise ValueError(f"export_structured removes neurons of sequential unstacked layers with neurons on "
                             f"the last axis; {p!r}: {problem} (use export_condensed or sj.condense)")
    kernels = {p: np.asarray(get_path(params, f"{p}/kernel")) * layer_masks[p] for p in order}
    biases = {p: (np.asarray(get_path(params, p)["bias"]) if "bias" in get_path(params, p)
                  else np.zeros(kernels[p].shape[-1], kernels[p].dtype)) for p in order}
    for path, nxt in zip(order[:-1], order[1:]):
        alive = as_matrix(layer_masks[path]).any(axis=0)  # neurons last: checked above
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
        has_bias = "bias" in get_path(params, p)
        out_params = set_path(out_params, f"{p}/kernel", jnp.asarray(kernels[p]))
        out_masks = set_path(out_masks, f"{p}/kernel", jnp.asarray(layer_masks[p]))
        if has_bias:
            out_params = set_path(out_params, f"{p}/bias", jnp.asarray(biases[p], kernels[p].dtype))
            out_masks = set_path(out_masks, f"{p}/bias", jnp.ones(biases[p].shape, bool))
        elif np.any(biases[p] != 0):
            raise ValueError(f"{p}: has no bias to absorb the removed neurons' constant output")
    return out_params, out_masks
