"""Which leaves are layers, and their (fan-in, neurons) matrix view: the one place inference decides this.

Today's convention (as the rest of srigl_jax): a layer is a dict holding a ``kernel`` leaf; neurons are on the
kernel's last axis, every other axis is fan-in (Dense (in, out), DenseGeneral (in..., out), Conv (kh, kw, in,
out)). A layout declaration (stacked / scanned layers, attention kernels) plugs in here.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

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


def as_matrix(kernel: Any) -> np.ndarray:
    """A layer's kernel (or mask) as its (fan_in, n_out) matrix: neurons on the last axis.

    >>> as_matrix(np.zeros((3, 3, 4, 8))).shape
    (36, 8)
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"a layer kernel needs >= 2 axes (fan-in..., neurons), got shape {kernel.shape}")
    return kernel.reshape(-1, kernel.shape[-1])
