"""Path naming for pytree leaves: one string per leaf, used by every filter and report."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

# nnx.State wraps arrays in Variables whose single child is reached through `.value`.
_TRANSPARENT_ATTRS = ("value", "raw_value")


def path_str(keypath: Sequence[Any]) -> str:
    """Return a '/'-joined name for a key path, e.g. ``"Dense_0/kernel"``.

    >>> import jax.numpy as jnp
    >>> leaves = jax.tree_util.tree_flatten_with_path({"Dense_0": {"kernel": jnp.zeros(2)}})[0]
    >>> path_str(leaves[0][0])
    'Dense_0/kernel'
    """
    parts = []
    for key in keypath:
        if isinstance(key, DictKey):
            parts.append(str(key.key))
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, GetAttrKey):
            if key.name not in _TRANSPARENT_ATTRS:
                parts.append(key.name)
        elif isinstance(key, FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # unknown key type: keep its own rendering
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Flatten ``tree`` into ``[(path, leaf), ...]`` and its treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef


def natural_key(path: str) -> list:
    """Sort key that orders 'Dense_2' before 'Dense_10'."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path)]


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """True if ``path`` matches (re.search) any of the regexes."""
    return any(re.search(p, path) for p in patterns)
