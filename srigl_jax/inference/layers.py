"""Which leaves are layers, and their per-slice (fan-in, neurons) matrix views: the one place inference decides
this, through :mod:`srigl_jax.layout` (the same rules and ``stack_axes`` / ``neuron_axes`` declarations as
training).

A layer is a dict holding a ``kernel`` leaf. Its :class:`~srigl_jax.layout.Layout` says which axes are stack axes
(one slice per layer of a ``nn.scan`` / ``nnx.vmap`` stack), fan-in axes and neuron axes; an ambiguous kernel (a
3-D kernel that could be a stacked Dense, a DenseGeneral or a 1-D conv) is an error naming the path, the shape
and the declaration to add. Slices may differ in active-neuron count and fan-in (ablation); :func:`pad_slices`
makes them one shape exactly (added entries carry weight 0), so that a stacked layer's condensed form is one
array per variable with the stack axes leading, sliced by ``nn.scan`` / ``nnx.scan`` like the kernel was.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from srigl_jax.layout import Axes, Layout, infer_layouts

Params = dict[str, Any]


def as_plain_dict(tree: Any) -> Params:
    """Flax FrozenDict / nested mappings -> nested plain dicts (leaves untouched)."""
    if isinstance(tree, Mapping) or hasattr(tree, "items"):
        return {k: as_plain_dict(v) for k, v in tree.items()}
    return tree


def kernel_layers(params: Params, prefix: str = "") -> list[str]:
    """Paths of every sub-dict that holds a 'kernel' leaf, e.g. ``["fc1", "block0/mlp_fc1"]``.

    >>> kernel_layers({"fc1": {"kernel": 1, "bias": 2}, "blk": {"out": {"kernel": 3}}, "scale": 4})
    ['fc1', 'blk/out']
    """
    found = []
    for key, value in params.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            if "kernel" in value and not hasattr(value["kernel"], "items"):
                found.append(path)
            found.extend(kernel_layers(value, path + "/"))
    return found


def layer_layouts(shapes: Mapping[str, tuple[int, ...]], *, stack_axes: Mapping[str, Axes] | None = None,
                  neuron_axes: Mapping[str, Axes] | None = None, lenient: set[str] | frozenset[str] = frozenset(),
                  ) -> dict[str, Layout]:
    """The :class:`~srigl_jax.layout.Layout` of every layer ``{layer path: kernel shape}`` (paths without the
    trailing ``/kernel``; the declarations' regexes are searched in ``"<layer path>/kernel"`` as in training).
    Layers in ``lenient`` (run as written: dense masks, ``kernels={path: "dense"}``) may stay ambiguous.

    >>> lay = layer_layouts({"blocks/Dense_0": (4, 8, 3)}, stack_axes={"blocks/": 0})["blocks/Dense_0"]
    >>> (lay.n_slices, lay.fan_in, lay.n_neurons)
    (4, 8, 3)
    """
    try:
        layouts = infer_layouts({f"{p}/kernel": tuple(s) for p, s in shapes.items()}, stack_axes=stack_axes,
                                neuron_axes=neuron_axes, lenient={f"{p}/kernel" for p in lenient})
    except ValueError as err:
        raise ValueError(f"{err} (inference takes the same stack_axes= / neuron_axes= declarations as training, "
                         "e.g. sj.condense(..., stack_axes=algo.stack_axes, neuron_axes=algo.neuron_axes))"
                         ) from None
    return {p: layouts[f"{p}/kernel"] for p in shapes}


def stack_shape(layout: Layout) -> tuple[int, ...]:
    """The sizes of the stack axes (``()`` for a plain layer)."""
    return tuple(layout.shape[a] for a in layout.stack_axes)


def module_layout_problem(layout: Layout) -> str:
    """'' if each slice of the kernel is what a Flax Dense / DenseGeneral / Conv module computes with (neurons
    on its last axis, fan-in the others in order) and the stack axes lead (``nn.scan`` / ``nnx.vmap`` with
    ``variable_axes`` / ``in_axes`` 0), so that condensed variables stacked on leading axes are sliced alike;
    else why not.

    >>> module_layout_problem(Layout((4, 8, 3), (0,), (2,), "declared"))
    ''
    >>> module_layout_problem(Layout((8, 2, 3), (), (1, 2), "attention_in"))
    'neuron axes (1, 2) of kernel (8, 2, 3) are not its last axis'
    """
    n_stack = len(layout.stack_axes)
    if layout.stack_axes != tuple(range(n_stack)):
        return f"stack axes {layout.stack_axes} of kernel {layout.shape} are not its leading axes"
    if layout.neuron_axes != (len(layout.shape) - 1,):
        return f"neuron axes {layout.neuron_axes} of kernel {layout.shape} are not its last axis"
    return ""


def bias_slices(layout: Layout, bias: Any, name: str) -> np.ndarray | None:
    """A layer's bias as ``(n_slices, n_neurons)`` (stack axes leading, then the neuron axes), or None."""
    if bias is None:
        return None
    bias = np.asarray(bias)
    want = stack_shape(layout) + tuple(layout.shape[a] for a in layout.neuron_axes)
    if bias.shape != want or (layout.stack_axes and layout.stack_axes != tuple(range(len(layout.stack_axes)))):
        raise ValueError(f"{name}: bias shape {bias.shape} does not match kernel {layout.shape} with stack axes "
                         f"{layout.stack_axes} and neuron axes {layout.neuron_axes} (expected {want}, stack "
                         "axes leading)")
    return bias.reshape(layout.n_slices, layout.n_neurons)


def pad_slices(kernel: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``(S, fan_in, n)`` (kernel, boolean mask) -> the same with every slice holding the same number of
    active neurons (the largest over slices) and every active neuron the same fan-in k (the largest), exactly:
    the kernel is multiplied by its mask, and the added mask entries (each neuron's first free inputs; for the
    extra neurons, the lowest-numbered ablated ones) carry weight 0, so every output is unchanged (an added
    neuron outputs 0 + its bias, as an ablated neuron does). A slice that is already the largest is unchanged.

    >>> m = np.array([[[1, 1], [1, 1], [0, 0]], [[1, 0], [0, 0], [0, 0]]], bool)   # slice 1: k' 1, 1 active
    >>> k, p = pad_slices(np.ones((2, 3, 2)), m)
    >>> p.sum(axis=1).tolist(), p[1].astype(int).tolist(), float(k[1].sum())
    ([[2, 2], [2, 2]], [[1, 1], [1, 1], [0, 0]], 1.0)
    """
    mask = np.asarray(mask, bool)
    counts = mask.sum(axis=1)  # (S, n)
    active = counts > 0
    k = int(counts.max(initial=0))
    n_active = int(active.sum(axis=1).max(initial=0))
    # Per slice, the ablated neurons ranked by index; the first (n_active - active) of them are added.
    ablated_rank = np.cumsum(~active, axis=1)
    added = ~active & (ablated_rank <= (n_active - active.sum(axis=1))[:, None])
    need = np.where(active | added, k - counts, 0)  # (S, n) entries to add per neuron
    free_rank = np.cumsum(~mask, axis=1)  # rank of each free input within its neuron's column
    padded = mask | (~mask & (free_rank <= need[:, None, :]))
    return np.asarray(kernel) * mask, padded


def map_slices(layout: Layout, kernel: Any, mask: Any, bias: Any, name: str,
               fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], Mapping[str, Any]],
               first_only: bool = False) -> dict[str, Any]:
    """``fn(kernel (fan_in, n), mask (fan_in, n), bias (n,) or None)`` on every slice of a layer after
    :func:`pad_slices`, its outputs stacked on the layout's stack axes (leading; nothing added for a plain
    layer): ``{name: array (*stack_shape, *shape fn returned)}``. ``first_only``: the first (padded) slice's
    outputs alone, without stack axes (what one step of the scan sees; for timing)."""
    kernel_s = layout.to_slices(np.asarray(kernel))
    mask_s = layout.to_slices(np.asarray(mask))
    biases = bias_slices(layout, bias, name)
    kernel_s, mask_s = pad_slices(kernel_s, mask_s)
    n_slices, lead = (1, ()) if first_only else (layout.n_slices, stack_shape(layout))
    per_slice = [fn(kernel_s[s], mask_s[s], None if biases is None else biases[s]) for s in range(n_slices)]
    return {key: np.stack([np.asarray(v[key]) for v in per_slice]).reshape(*lead, *np.shape(per_slice[0][key]))
            for key in per_slice[0]}


def as_matrix(kernel: Any) -> np.ndarray:
    """One layer slice in the layout a Flax module computes with (neurons on the last axis, every other axis
    fan-in; :func:`module_layout_problem` is '') as its (fan_in, n_out) matrix. Leaves of any other layout go
    through :meth:`Layout.to_slices`.

    >>> as_matrix(np.zeros((3, 3, 4, 8))).shape
    (36, 8)
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"a layer kernel needs >= 2 axes (fan-in..., neurons), got shape {kernel.shape}")
    return kernel.reshape(-1, kernel.shape[-1])
