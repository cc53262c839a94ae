"""What a layer is: for every sparse-candidate leaf, which axes index separate layers (stack axes), which index a
neuron's inputs (fan-in axes) and which index its neurons (neuron axes).

This is the only place that looks at paths and shapes to decide it; plans, the mask update, metrics, ITOP and
analysis all go through :class:`Layout`. Inference rules (anything else is an error that names the path and
shape and says how to declare it, never a guess):

* 2 axes (after removing declared stack axes): a Dense kernel ``(in, out)``.
* 3 axes: a Flax attention ``DenseGeneral`` in-projection ``query``/``key``/``value`` ``(in, heads, head_dim)``
  (neurons = the (head, dim) outputs) or out-projection ``out`` ``(heads, head_dim, out)``, recognised when
  ``out`` and in-projections sit side by side with consistent shapes (``nn.MultiHeadDotProductAttention``,
  ``nnx.MultiHeadAttention``); or a 1-D conv ``(window, in, out)`` when the owning module's name contains "conv".
  Anything else with 3 axes (e.g. a Dense stacked by ``nn.scan``: ``(layers, in, out)``) must be declared.
* 4 axes: a Flax 2-D Conv kernel ``(kh, kw, in, out)``, the one default by shape alone (a stacked 1-D conv
  ``(layers, window, in, out)`` has the same rank and must be declared with ``stack_axes``).
* 5 or more axes: a stacked 2-D conv ``(layers, kh, kw, in, out)`` or a 3-D conv: must be declared.

Declarations (regexes searched in the leaf path; axes index the full leaf, negative allowed):
``stack_axes={regex: axis or axes}`` marks axes whose slices are separate layers, and
``neuron_axes={regex: axis or axes}`` says which axes index the neurons (the rest are fan-in).

>>> lay = infer_layouts({"blocks/Dense_0/kernel": (4, 32, 16)}, stack_axes={"blocks/": 0})
>>> l = lay["blocks/Dense_0/kernel"]
>>> (l.n_slices, l.fan_in, l.n_neurons, l.slice_shape)
(4, 32, 16, (32, 16))
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence, Union

import jax
import numpy as np

Axes = Union[int, Sequence[int]]
KINDS = ("dense", "conv", "attention_in", "attention_out", "declared", "undeclared")
_ATTENTION_IN = ("query", "key", "value")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Axis roles of one kernel leaf. ``stack_axes`` and ``neuron_axes`` are sorted, non-negative; every other
    axis is a fan-in axis. A slice (one layer) is viewed as a ``(fan_in, n_neurons)`` matrix, one column per
    neuron, with fan-in and neuron positions in row-major order of their axes."""

    shape: tuple[int, ...]
    stack_axes: tuple[int, ...]
    neuron_axes: tuple[int, ...]
    kind: str

    @property
    def fan_in_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.stack_axes + self.neuron_axes)

    @property
    def n_slices(self) -> int:
        return int(np.prod([self.shape[a] for a in self.stack_axes], dtype=np.int64))

    @property
    def fan_in(self) -> int:
        return int(np.prod([self.shape[a] for a in self.fan_in_axes], dtype=np.int64))

    @property
    def n_neurons(self) -> int:
        return int(np.prod([self.shape[a] for a in self.neuron_axes], dtype=np.int64))

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """The shape of one layer: the leaf's shape without its stack axes (ERK is computed on it)."""
        return tuple(d for a, d in enumerate(self.shape) if a not in self.stack_axes)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.stack_axes + self.fan_in_axes + self.neuron_axes

    def to_slices(self, x: jax.Array) -> jax.Array:
        """Leaf -> ``(n_slices, fan_in, n_neurons)``; a free reshape for the usual layouts."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"array of shape {tuple(x.shape)} does not have this layout's shape {self.shape}")
        perm = self._perm
        if perm != tuple(range(len(perm))):
            x = x.transpose(perm)
        return x.reshape(self.n_slices, self.fan_in, self.n_neurons)

    def from_slices(self, x: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_slices`."""
        perm = self._perm
        x = x.reshape(tuple(self.shape[a] for a in perm))
        if perm != tuple(range(len(perm))):
            x = x.transpose(np.argsort(perm))
        return x

    def neuron_fan_in(self, mask: jax.Array) -> jax.Array:
        """Active weights per (slice, neuron): ``(n_slices, n_neurons)`` int32."""
        return self.to_slices(mask).sum(axis=1, dtype=np.int32)


def _normalise(axes: Axes, ndim: int, what: str, path: str) -> tuple[int, ...]:
    values = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    out = []
    for a in values:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool) or not -ndim <= a < ndim:
            raise ValueError(f"{what} {axes!r} for {path!r} (ndim {ndim}) must be axis indices in [-{ndim}, {ndim})")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} {axes!r} for {path!r} repeats an axis")
    return tuple(sorted(out))


def _declared(path: str, table: Mapping[str, Axes], what: str, used: set[str]) -> Axes | None:
    hits = [(rx, axes) for rx, axes in table.items() if re.search(rx, path)]
    if len({repr(a) for _, a in hits}) > 1:
        raise ValueError(f"{what}: {path!r} is matched by several regexes with different axes: {hits}")
    used.update(rx for rx, _ in hits)
    return hits[0][1] if hits else None


def _module_of(path: str) -> tuple[str, str]:
    """("parent/path", "module") of ".../parent/module/kernel"."""
    parts = path.split("/")
    return "/".join(parts[:-2]), (parts[-2] if len(parts) >= 2 else "")


def _attention_kinds(slice_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Paths of Flax attention DenseGeneral kernels, recognised by their siblings: in-projections (query, key,
    value; those present) ``(in, heads, head_dim)`` of one shape beside out ``(heads, head_dim, out)``."""
    by_parent: dict[str, dict[str, str]] = {}
    for path in slice_shapes:
        parent, module = _module_of(path)
        if path.endswith("/kernel") and module in _ATTENTION_IN + ("out",):
            by_parent.setdefault(parent, {})[module] = path
    kinds = {}
    for members in by_parent.values():
        ins = [members[m] for m in _ATTENTION_IN if m in members]
        if "out" not in members or not ins:
            continue
        q, out = slice_shapes[ins[0]], slice_shapes[members["out"]]
        if len(q) == 3 and len(out) == 3 and all(slice_shapes[p] == q for p in ins) and out[:2] == q[1:]:
            kinds.update({p: "attention_in" for p in ins})
            kinds[members["out"]] = "attention_out"
    return kinds


def infer_layouts(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    stack_axes: Mapping[str, Axes] | None = None,
    neuron_axes: Mapping[str, Axes] | None = None,
    lenient: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Layout]:
    """The :class:`Layout` of every candidate kernel (``{path: shape}``, ndim >= 2), from the rules in the module
    docstring and the declarations. Raises ValueError for a layout that cannot be inferred unambiguously and for
    a declaration that matches no candidate. Paths in ``lenient`` (layers kept dense, whose layout only matters
    for reporting) get kind "undeclared" (neurons on the last axis) instead of an error."""
    stack_axes, neuron_axes = dict(stack_axes or {}), dict(neuron_axes or {})
    used: set[str] = set()
    stacks, slice_shapes = {}, {}
    for path, shape in shapes.items():
        declared = _declared(path, stack_axes, "stack_axes", used)
        stacks[path] = () if declared is None else _normalise(declared, len(shape), "stack_axes", path)
        slice_shapes[path] = tuple(d for a, d in enumerate(shape) if a not in stacks[path])
    attention = _attention_kinds(slice_shapes)
    out = {}
    for path, shape in shapes.items():
        shape, stack = tuple(int(d) for d in shape), stacks[path]
        unstacked = [a for a in range(len(shape)) if a not in stack]
        declared = _declared(path, neuron_axes, "neuron_axes", used)
        if declared is not None:
            neurons, kind = _normalise(declared, len(shape), "neuron_axes", path), "declared"
            if set(neurons) & set(stack):
                raise ValueError(f"{path!r} {shape}: an axis cannot be both a stack axis and a neuron axis")
        elif len(unstacked) == 2:
            neurons, kind = (unstacked[-1],), "dense"
        elif attention.get(path) == "attention_in":
            neurons, kind = tuple(unstacked[-2:]), "attention_in"
        elif attention.get(path) == "attention_out":
            neurons, kind = (unstacked[-1],), "attention_out"
        elif len(unstacked) == 4 or (len(unstacked) == 3 and re.search("(?i)conv", _module_of(path)[1])):
            neurons, kind = (unstacked[-1],), "conv"
        elif len(unstacked) >= 5 and path not in lenient:
            raise ValueError(
                f"cannot tell the layout of {path!r} with shape {shape}: {len(unstacked)} axes could be a Conv "
                f"stacked by nn.scan / nnx.vmap (layers, *window, in, out) or a {len(unstacked) - 2}-D conv "
                f"(*window, in, out). Declare it: stack_axes={{{path!r}: 0}} for stacked layers, or "
                f"neuron_axes={{{path!r}: -1}} for one conv (neurons last, the rest fan-in).")
        elif len(unstacked) < 2:
            raise ValueError(f"{path!r} {shape}: after the stack axes {stack} fewer than 2 axes remain; a layer "
                             "needs fan-in and neuron axes")
        elif path in lenient:
            neurons, kind = (unstacked[-1],), "undeclared"
        else:
            raise ValueError(
                f"cannot tell the layout of {path!r} with shape {shape}: 3 axes could be a Dense stacked by "
                f"nn.scan / nnx.vmap (layers, in, out), a DenseGeneral (in, heads, head_dim) or a 1-D conv "
                f"(window, in, out). Declare it: stack_axes={{{path!r}: 0}} for stacked layers, or "
                f"neuron_axes={{{path!r}: (1, 2)}} (DenseGeneral) / {{{path!r}: -1}} (conv-like, neurons last).")
        layout = Layout(shape, stack, neurons, kind)
        if not layout.fan_in_axes:
            raise ValueError(f"{path!r} {shape}: no fan-in axis left (stack axes {stack}, neuron axes {neurons})")
        out[path] = layout
    for what, table in (("stack_axes", stack_axes), ("neuron_axes", neuron_axes)):
        unused = sorted(set(table) - used)
        if unused:
            raise ValueError(f"{what} regexes {unused} match no sparse-candidate kernel; candidates: {sorted(shapes)}")
    return out
