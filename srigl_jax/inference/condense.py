"""Condensed inference for a whole, unchanged Flax model: :func:`condense`.

Linen: ``fast = condense(model, variables, masks, example=x)``; ``fast(x, **apply_kwargs)`` equals
``model.apply(variables, x, **apply_kwargs)`` (to fp32 rounding). The model definition is not changed: every
``nn.Dense`` / ``nn.Conv`` / ``nn.DenseGeneral`` call is intercepted (``flax.linen.intercept_methods``), matched
to its params and masks by its scope path (``"stage1_0/conv1"``), and run by the kernel chosen for that layer
(:mod:`srigl_jax.inference.kernels`). NNX: ``condense(module, masks)`` returns a copy of the module whose
``nnx.Linear`` / ``nnx.Conv`` layers are replaced by :class:`CondensedLayer` modules (graph surgery).

Per-layer choice: with an ``example`` input, every kernel that supports a layer is timed on that layer's own
input shape (found by one abstract pass; the leading axis set to ``batch_size`` if given), interleaved with
the dense op; a kernel replaces dense only if its median is faster by ``margin`` and it wins most paired
repetitions, so timing noise keeps dense rather than picking a slower kernel. Then the whole model is timed
against the dense model (``check_model``) and falls back to dense if it is not faster. Without an example a
fixed rule is used (condensed FFI for sparse linear layers when the C++ kernel is built, structured for layers
with ablated neurons, else dense). ``kernels={regex: name}`` overrides the choice per layer.

Layers are viewed through their :class:`~srigl_jax.layout.Layout` (the training side's rules and
``stack_axes`` / ``neuron_axes`` declarations). A stacked layer (``nn.scan`` / ``nn.vmap`` / ``nnx.vmap``, stack
axes leading) is condensed slice by slice, each with its own active neurons and k', padded exactly to the largest
slice (:func:`~srigl_jax.inference.layers.pad_slices`); the stacked kernel variables replace the layer's params,
so the model's own scan hands each step its slice and the intercepted call runs the chosen kernel on it.

Ablated neurons (all-False mask columns) are zero-skipped, not removed: the chosen kernel computes only the
active neurons and scatters them to the full width (the ablated ones output their bias), so every layer keeps
its output shape. Removing them would change the next layer's input width, and under interception the next
layer is only a call in unknown code (a residual add, a reshape, a norm can sit between); removal with the
constant ``act(bias)`` folded forward is exact only for known sequential chains: :func:`export_structured`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.linen import dtypes as linen_dtypes
from flax.linen.linear import canonicalize_padding
from tqdm.auto import tqdm

from srigl_jax.inference.export import check_bool_mask, get_path, set_path
from srigl_jax.inference.kernels import CONV, DENSE, KERNELS, LINEAR, LayerCall, LayerStats
from srigl_jax.inference.layers import as_plain_dict, kernel_layers, layer_layouts, map_slices, module_layout_problem
from srigl_jax.layout import Axes, Layout
from srigl_jax.paths import named_leaves

Array = jax.Array
Params = dict[str, Any]
AUTO = "auto"


# --------------------------------------------------------------------------------------------------------------
# The record of a choice
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """How one layer runs: the kernel, why, and the measured median times (microseconds) of every candidate."""

    path: str
    module: str  # "Dense", "Conv", "DenseGeneral", or "" when the model never called it as such
    kernel_shape: tuple[int, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    fan_in: int | None  # None: not constant fan-in
    n_active: int
    n_out: int
    kernel: str
    reason: str
    times_us: tuple[tuple[str, float], ...] = ()
    n_in: int = 0  # the layer's fan-in (inputs of one slice's neuron before masking)
    n_slices: int = 1  # layers stacked in the kernel (nn.scan / nnx.vmap); fan_in and n_active: the largest

    def row(self) -> dict[str, Any]:
        """A flat dict (for tables, JSON)."""
        out = dataclasses.asdict(self)
        out["times_us"] = dict(self.times_us)
        return out


def format_choices(choices: Sequence[LayerChoice]) -> str:
    """A text table of per-layer choices (path, shapes, k, active/out, kernel, times, reason)."""
    head = f"{'layer':<28} {'module':<7} {'kernel shape':<18} {'k':>5} {'active':>11}  {'kernel':<17} times (us)"
    lines = [head, "-" * len(head)]
    for c in choices:
        times = " ".join(f"{n}={t:.0f}" for n, t in c.times_us)
        active = f"{c.n_active}/{c.n_out}" + (f" x{c.n_slices}" if c.n_slices > 1 else "")
        lines.append(f"{c.path:<28} {c.module:<7} {str(c.kernel_shape):<18} {str(c.fan_in or '-'):>5} "
                     f"{active:>11}  {c.kernel:<17} {times}  [{c.reason}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# What a module call computes
# --------------------------------------------------------------------------------------------------------------
def _ints(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _default_numerics(module: Any) -> str:
    dtype = getattr(module, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return f"computes in {jnp.dtype(dtype)}"
    promote = getattr(module, "promote_dtype", linen_dtypes.promote_dtype)
    if promote is not linen_dtypes.promote_dtype and promote is not nnx.nn.dtypes.promote_dtype:
        return "custom promote_dtype"
    for name in ("dot_general", "dot_general_cls", "conv_general_dilated", "conv_general_dilated_cls"):
        value = getattr(module, name, None)
        if value is not None and value is not jax.lax.dot_general and value is not jax.lax.conv_general_dilated:
            return f"custom {name}"
    return ""


def _conv_call(module: Any) -> LayerCall | str:
    window = _ints(module.kernel_size, 1 if isinstance(module.kernel_size, int) else len(module.kernel_size))
    if len(window) != 2:
        return f"{len(window)}-D convolution (condensed convs are 2-D)"
    if getattr(module, "input_dilation", 1) not in (1, None) and set(_ints(module.input_dilation, 2)) != {1}:
        return "input dilation"
    if module.kernel_dilation not in (1, None) and set(_ints(module.kernel_dilation, 2)) != {1}:
        return "kernel dilation"
    if module.feature_group_count != 1:
        return "grouped convolution"
    if getattr(module, "mask", None) is not None:
        return "the module has its own weight mask"
    try:
        padding = canonicalize_padding(module.padding, 2)
    except ValueError as err:
        return str(err)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return f"padding {padding!r}"
        padding = padding.upper()
    else:
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return LayerCall(CONV, window=window, strides=_ints(module.strides, 2), padding=padding)


def layer_call(module: Any) -> LayerCall | str:
    """The :class:`LayerCall` of a linen nn.Dense / nn.DenseGeneral / nn.Conv or nnx.Linear / nnx.Conv module,
    or why its calls cannot be replaced (other module types, non-default numerics, dilations, groups, ...)."""
    kind = type(module)
    numerics = _default_numerics(module)
    if kind in (nn.Dense, nnx.Linear):
        return numerics or LayerCall(LINEAR)
    if kind in (nn.Conv, nnx.Conv):
        return numerics or _conv_call(module)
    if kind is nn.DenseGeneral:
        axis = _ints(module.axis, 1)
        features = _ints(module.features, 1)
        if module.batch_dims or len(features) != 1:
            return "DenseGeneral with batch_dims or several output axes"
        if axis != tuple(range(-len(axis), 0)):
            return f"DenseGeneral contracting axes {axis} (only the trailing axes, given as negative numbers)"
        return numerics or LayerCall(LINEAR, n_in_axes=len(axis))
    return f"{kind.__name__} calls are not replaced"


def _module_path(module: nn.Module) -> str | None:
    scope = module.scope
    return None if scope is None else "/".join(scope.path)


# --------------------------------------------------------------------------------------------------------------
# Layers and masks
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str
    kernel: np.ndarray
    mask: np.ndarray
    bias: np.ndarray | None
    layout: Layout
    stats: LayerStats  # of one slice (the largest active count and fan-in over slices)
    reason: str  # why it cannot be replaced: not sparse constant fan-in, or a layout no module computes with


def _slice_stats(layout: Layout, kernel: np.ndarray, mask: np.ndarray) -> tuple[LayerStats, str]:
    """Stats over the slices of a layer (each slice its own active neurons and k') and why it is not a
    replaceable sparse constant fan-in layer ('' if it is)."""
    counts = layout.to_slices(mask).sum(axis=1)  # (S, n)
    active = counts > 0
    bad = [s for s in range(layout.n_slices) if np.unique(counts[s][active[s]]).size > 1]
    fan_in = None if bad else int(counts.max(initial=0))
    stats = LayerStats(layout.slice_shape, fan_in, int(active.sum(axis=1).max(initial=0)), layout.n_neurons,
                       bool(mask.all()), layout.n_slices)
    if stats.dense_mask:
        return stats, "dense mask"
    if bad:
        reason = "not constant fan-in" + (f" (slice {bad[0]})" if layout.n_slices > 1 else "")
    elif np.any(kernel[~mask] != 0):
        reason = "nonzero weights outside the mask"
    else:
        reason = module_layout_problem(layout)
    return stats, reason


def _layers(params: Params, masks: Params, *, stack_axes: Mapping[str, Axes] | None = None,
            neuron_axes: Mapping[str, Axes] | None = None, kernels: Mapping[str, str] | None = None
            ) -> dict[str, _Layer]:
    """Every kernel layer of ``params`` with its checked boolean mask and its layout (the declarations as in
    training; layers that run as written, dense masks or ``kernels={path: "dense"}``, may stay ambiguous);
    errors name the tree that lacks a layer."""
    params, masks = as_plain_dict(params), as_plain_dict(masks)
    param_layers = kernel_layers(params)
    extra = sorted(set(kernel_layers(masks)) - set(param_layers))
    if extra:
        raise KeyError(f"the params tree lacks {extra[0]!r}/kernel, which the masks tree has "
                       f"({len(extra)} such layers)")
    arrays = {}
    for path in param_layers:
        kernel = np.asarray(get_path(params, f"{path}/kernel", "params"))
        mask = check_bool_mask(get_path(masks, f"{path}/kernel", "masks"), f"masks {path}/kernel")
        if mask.shape != kernel.shape:
            raise ValueError(f"{path}: masks kernel shape {mask.shape} != params kernel shape {kernel.shape}")
        arrays[path] = kernel, mask
    as_written = {p for p, (_, m) in arrays.items() if m.all() or _override(p, kernels) == DENSE.name}
    layouts = layer_layouts({p: k.shape for p, (k, _) in arrays.items()}, stack_axes=stack_axes,
                            neuron_axes=neuron_axes, lenient=as_written)
    out = {}
    for path, (kernel, mask) in arrays.items():
        layer_params = get_path(params, path)
        bias = np.asarray(layer_params["bias"]) if "bias" in layer_params else None
        stats, reason = _slice_stats(layouts[path], kernel, mask)
        out[path] = _Layer(path, kernel, mask, bias, layouts[path], stats, reason)
    return out


def _prepare(layer: _Layer, name: str, call: LayerCall, first_slice: bool = False) -> dict[str, Array]:
    """Kernel ``name``'s variables for ``layer``: one slice at a time (padded exactly to the largest slice),
    stacked on the leading stack axes; ``first_slice``: only the first slice's (for timing)."""
    shape = layer.layout.slice_shape

    def one(kernel, mask, bias):
        return KERNELS[name].prepare(kernel.reshape(shape), mask.reshape(shape), bias, call)

    variables = map_slices(layer.layout, layer.kernel, layer.mask, layer.bias, layer.path, one, first_slice)
    return {k: jnp.asarray(v) for k, v in variables.items()}


def _override(path: str, kernels: Mapping[str, str] | None) -> str | None:
    """The kernel name the user's ``kernels={regex: name}`` gives ``path`` (None: no regex matches)."""
    if not kernels:
        return None
    names = {name for pattern, name in kernels.items() if re.search(pattern, path)}
    if len(names) > 1:
        raise ValueError(f"kernels=: layer {path!r} is matched by regexes naming different kernels {sorted(names)}")
    return names.pop() if names else None


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    """How kernels are timed. A kernel replaces dense only if its median time * (1 + margin) <= dense's and
    it is faster in at least ``min_wins`` of the paired (interleaved) repetitions."""

    reps: int = 15
    budget_s: float = 2.0  # per layer shape; at least 3 repetitions are always taken
    margin: float = 0.1
    min_wins: float = 0.75


def _time_interleaved(fns: Mapping[str, Callable[[], Any]], timing: Timing) -> dict[str, np.ndarray]:
    """Run each zero-arg function once (compile), then ``reps`` interleaved rounds; seconds per round."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(timing.reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > timing.budget_s:
            break
    return {name: np.asarray(t) for name, t in times.items()}


def _pick(times: Mapping[str, np.ndarray], baseline: str, timing: Timing) -> tuple[str, str]:
    """(winner, reason): the fastest candidate if it beats ``baseline`` clearly, else ``baseline``."""
    base = times[baseline]
    others = {n: t for n, t in times.items() if n != baseline}
    if not others:
        return baseline, "no other kernel supports this layer"
    best = min(others, key=lambda n: np.median(others[n]))
    ratio = np.median(base) / np.median(others[best])
    wins = float(np.mean(others[best] < base))
    if ratio >= 1 + timing.margin and wins >= timing.min_wins:
        return best, f"measured {ratio:.2f}x {baseline}"
    return baseline, f"best other {best} {ratio:.2f}x, wins {wins:.0%}: kept {baseline}"


def _random_input(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _measure_layer(layer: _Layer, call: LayerCall, inputs: Sequence[jax.ShapeDtypeStruct], names: Sequence[str],
                   timing: Timing) -> dict[str, np.ndarray]:
    """Seconds per run (summed over the layer's recorded input shapes) of every kernel in ``names``."""
    xs = [_random_input(s.shape, s.dtype) for s in inputs]
    fns = {}
    for name in names:
        kern = KERNELS[name]
        variables = _prepare(layer, name, call, first_slice=True)
        fn = jax.jit(lambda v, x, kern=kern: kern.apply(v, x, call))
        fns[name] = lambda fn=fn, variables=variables: [fn(variables, x) for x in xs]
    return _time_interleaved(fns, timing)


# --------------------------------------------------------------------------------------------------------------
# The condensed linen model
# --------------------------------------------------------------------------------------------------------------
@struct.dataclass
class CondensedModel:
    """An unchanged linen model with its constant fan-in layers run by the chosen kernels (a pytree).

    ``variables``: the model's variables with each replaced layer's params ``{kernel, bias}`` replaced by its
    kernel's variables (e.g. ``{values, indices, bias, active}``; a stacked layer's with the stack axes leading,
    so that ``nn.scan`` slices them as it sliced the kernel); plain dicts of arrays: save them with Orbax and
    put them back with :meth:`with_variables`. ``choices``: one :class:`LayerChoice` per kernel layer.
    ``fast(*args, **kwargs)`` equals ``model.apply(variables, *args, **kwargs)``; so does
    ``fast.apply(fast.variables, *args, **kwargs)`` (the functional form, for ``jax.jit`` with the variables as
    arguments rather than constants).
    """

    variables: Params
    model: nn.Module = struct.field(pytree_node=False)
    choices: tuple[LayerChoice, ...] = struct.field(pytree_node=False)

    # Identity hashing: the variables (dicts of arrays) are not hashable, and jax.jit(fast) needs a hashable
    # callable.
    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def apply(self, variables: Params, *args: Any, **kwargs: Any) -> Any:
        """``model.apply`` with the replaced layers' calls intercepted."""
        routes = {c.path: c for c in self.choices if c.kernel != DENSE.name}
        with nn.intercept_methods(_router(routes)):
            return self.model.apply(variables, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply(self.variables, *args, **kwargs)

    def with_variables(self, variables: Params) -> "CondensedModel":
        """The same model and choices with other (e.g. restored) variables of the same structure."""
        if jax.tree.structure(variables) != jax.tree.structure(self.variables):
            raise ValueError("variables do not have the structure of this condensed model's variables")
        return self.replace(variables=variables)

    def table(self) -> str:
        """The per-layer choice table."""
        return format_choices(self.choices)


def _call_fan_in(call: LayerCall, x: Array) -> int:
    """The fan-in a module call contracts over: its trailing input axes, or a conv's window times channels."""
    if call.op == CONV:
        return int(np.prod(call.window)) * int(x.shape[-1])
    return int(np.prod(x.shape[len(x.shape) - call.n_in_axes:]))


def _router(routes: Mapping[str, LayerChoice]):
    """An interceptor running each routed module's ``__call__`` with its kernel, on the kernel variables that
    replaced the module's params (inside ``nn.scan`` the module's scope holds its own slice of them)."""
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = _module_path(context.module)
        choice = routes.get(path)
        if choice is None:
            return next_fun(*args, **kwargs)
        call = layer_call(context.module)
        if isinstance(call, str):
            raise ValueError(f"condensed layer {path!r} ({choice.kernel}) is called through a module it cannot "
                             f"replace: {call}; pass kernels={{{path!r}: 'dense'}}")
        x = args[0] if args else kwargs["inputs"]
        features = _ints(getattr(context.module, "features", choice.n_out), 1)
        if _call_fan_in(call, x) != choice.n_in or int(np.prod(features)) != choice.n_out:
            raise ValueError(
                f"condensed layer {path!r}: the module computes {_call_fan_in(call, x)} -> {int(np.prod(features))} "
                f"features, its condensed layer {choice.n_in} -> {choice.n_out} (kernel {choice.kernel_shape}, "
                f"{choice.n_slices} slice(s)); declare stacked kernels with stack_axes= as in training, or pass "
                f"kernels={{{path!r}: 'dense'}}")
        variables = dict(context.module.variables.get("params", {}))
        return KERNELS[choice.kernel].apply(variables, x, call)
    return interceptor


@dataclasses.dataclass
class _Seen:
    module: str
    call: LayerCall | str
    inputs: list[jax.ShapeDtypeStruct]
    kernel_shape: tuple[int, ...] | None


def _record_calls(model: nn.Module, variables: Params, example: tuple, apply_kwargs: Mapping[str, Any]
                  ) -> dict[str, _Seen]:
    """One abstract pass: every replaceable-type module call, its input shape and the kernel shape it sees."""
    seen: dict[str, _Seen] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and type(module) in (nn.Dense, nn.Conv, nn.DenseGeneral):
            path = _module_path(module)
            x = args[0] if args else kwargs["inputs"]
            kernel = module.variables.get("params", {}).get("kernel")
            entry = seen.setdefault(path, _Seen(type(module).__name__, layer_call(module), [],
                                                None if kernel is None else tuple(kernel.shape)))
            struct_ = jax.ShapeDtypeStruct(x.shape, x.dtype)
            if struct_ not in entry.inputs:
                entry.inputs.append(struct_)
        return out

    def run(v, *a):
        with nn.intercept_methods(interceptor):
            return model.apply(v, *a, **apply_kwargs)

    jax.eval_shape(run, variables, *example)
    return seen


def _as_example(example: Any, batch_size: int | None) -> tuple:
    args = example if isinstance(example, tuple) else (example,)
    structs = tuple(jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), a) for a in args)
    if batch_size is None:
        return structs
    return tuple(jax.tree.map(lambda s: jax.ShapeDtypeStruct((batch_size, *s.shape[1:]), s.dtype), a)
                 for a in structs)


def _static_choice(layer: _Layer, call: LayerCall, x_dtype: Any) -> str:
    """The rule without a measurement: condensed FFI for linear layers, structured where neurons are ablated."""
    for name in ("condensed_ffi", "structured"):
        if name in KERNELS and not KERNELS[name].unsupported(call, layer.stats, x_dtype):
            return name
    return DENSE.name


def _record(layer: _Layer, module: str, input_shapes: tuple[tuple[int, ...], ...]) -> dict[str, Any]:
    """The facts of a :class:`LayerChoice` besides the choice."""
    stats, layout = layer.stats, layer.layout
    return dict(path=layer.path, module=module, kernel_shape=layout.shape, input_shapes=input_shapes,
                fan_in=stats.fan_in, n_active=stats.n_active, n_out=stats.n_out, n_in=layout.fan_in,
                n_slices=layout.n_slices)


def _check_module_kernel(layer: _Layer, module: str, kernel_shape: tuple[int, ...] | None) -> None:
    """The kernel the module computes with must be one slice of the layer's layout."""
    layout = layer.layout
    if kernel_shape is not None and tuple(kernel_shape) != layout.slice_shape:
        raise ValueError(
            f"model layer {layer.path!r} ({module}) cannot be matched to its mask: the module computes with a "
            f"kernel of shape {tuple(kernel_shape)}, the params/masks trees hold {layout.shape}, whose layout "
            f"(stack axes {layout.stack_axes}) gives slices of shape {layout.slice_shape}. A stacked layer "
            f"(nn.scan / nn.vmap / nnx.vmap) needs the stack_axes= declaration given to training, e.g. "
            f"stack_axes={{{layer.path + '/'!r}: 0}}; or pass kernels={{{layer.path!r}: 'dense'}} to run it as "
            "it is")


def _decide(layer: _Layer, entry: _Seen | None, call: LayerCall | str, override: str | None, measuring: bool,
            timing: Timing, measured: dict) -> LayerChoice:
    """One layer's kernel: the override, else dense with a reason, else the fixed rule or the measurement
    (``measured`` caches timings by shapes: same-shape layers are timed once)."""
    path, stats = layer.path, layer.stats
    inputs = tuple(entry.inputs) if entry else ()
    x_dtype = inputs[0].dtype if inputs else layer.kernel.dtype
    record = _record(layer, entry.module if entry else "", tuple(s.shape for s in inputs))
    if override == DENSE.name:
        return LayerChoice(**record, kernel=DENSE.name, reason="kernels= override")
    if entry is not None:
        _check_module_kernel(layer, entry.module, entry.kernel_shape)
    if measuring and entry is None:
        reason = "not called as nn.Dense / nn.Conv / nn.DenseGeneral by the model"
    else:
        reason = call if isinstance(call, str) else layer.reason
    if stats.dense_mask and reason == layer.reason:
        override = None  # regex overrides name sparse layers: a dense-mask layer runs as it is
    if override not in (None, AUTO):
        why = reason or KERNELS[override].unsupported(call, stats, x_dtype)
        if why:
            raise ValueError(f"kernels=: layer {path!r} cannot run {override!r}: {why}")
        return LayerChoice(**record, kernel=override, reason="kernels= override")
    if reason:
        return LayerChoice(**record, kernel=DENSE.name, reason=reason)
    if not measuring:
        return LayerChoice(**record, kernel=_static_choice(layer, call, x_dtype),
                           reason="fixed rule (no example input to measure on)")
    names = [n for n, k in KERNELS.items() if not k.unsupported(call, stats, x_dtype)]
    key = (call, stats.kernel_shape, stats.fan_in, stats.n_active, inputs, tuple(names))
    if key not in measured:
        measured[key] = (_measure_layer(layer, call, inputs, names, timing), path)
    times, first = measured[key]
    kernel, reason = _pick(times, DENSE.name, timing)
    if first != path:
        reason += f" (timed on {first}: same shapes)"
    return LayerChoice(**record, kernel=kernel, reason=reason,
                       times_us=tuple((n, float(np.median(v) * 1e6)) for n, v in times.items()))


def _condense_linen(model: nn.Module, variables: Params, masks: Params, *, example: Any,
                    apply_kwargs: Mapping[str, Any] | None, batch_size: int | None,
                    kernels: Mapping[str, str] | None, timing: Timing, check_model: bool,
                    stack_axes: Mapping[str, Axes] | None, neuron_axes: Mapping[str, Axes] | None,
                    progress: bool) -> CondensedModel:
    variables = as_plain_dict(variables)
    if "params" not in variables:
        raise KeyError("variables has no 'params' collection (pass the dict model.init returned)")
    apply_kwargs = dict(apply_kwargs or {})
    _check_kernel_names(kernels)
    layers = _layers(variables["params"], masks, stack_axes=stack_axes, neuron_axes=neuron_axes, kernels=kernels)
    structs = _as_example(example, batch_size) if example is not None else None
    seen = _record_calls(model, variables, structs, apply_kwargs) if structs is not None else {}
    measured: dict = {}
    choices, model_params = [], variables["params"]
    # Measuring takes from seconds (an MLP) to minutes (ViT-B/16 at batch 256): one step per layer, one for the
    # whole-model check; nothing is shown without an example input (nothing is timed then).
    bar = tqdm(total=len(layers) + int(check_model), desc="condense: timing kernels", unit="layer",
               disable=not (progress and structs is not None), leave=False)
    with bar:
        for path, layer in layers.items():
            bar.set_postfix_str(path, refresh=False)
            entry = seen.get(path)
            call = entry.call if entry else _guess_call(layer)
            choice = _decide(layer, entry, call, _override(path, kernels), structs is not None, timing, measured)
            choices.append(choice)
            if choice.kernel != DENSE.name:
                model_params = set_path(model_params, path, _prepare(layer, choice.kernel, call))
            bar.update()
        fast = CondensedModel({**variables, "params": model_params}, model, tuple(choices))
        if check_model and any(c.kernel != DENSE.name and c.times_us for c in choices):
            bar.set_postfix_str("whole model vs dense", refresh=False)
            fast = _check_whole_model(fast, variables, structs, apply_kwargs, timing)
        bar.update(bar.total - bar.n)
    return fast


def _check_kernel_names(kernels: Mapping[str, str] | None) -> None:
    for name in sorted(set((kernels or {}).values()) - set(KERNELS) - {AUTO}):
        raise ValueError(f"kernels=: unknown kernel {name!r}; known: {sorted(KERNELS)} or 'auto'")


def _guess_call(layer: _Layer) -> LayerCall | str:
    """Without an example the calls are unknown: a 2-D kernel (slice) is taken for a linear layer, 4-D for a conv
    whose stride and padding the interceptor reads from the module at run time (checked there)."""
    shape = layer.layout.slice_shape
    ndim = len(shape)
    if ndim == 2:
        return LayerCall(LINEAR)
    if ndim == 4:
        return LayerCall(CONV, window=shape[:2], strides=(1, 1), padding="SAME")
    return f"{ndim}-D kernel without an example input"


def _check_whole_model(fast: CondensedModel, variables: Params, structs: tuple, apply_kwargs: Mapping[str, Any],
                       timing: Timing) -> CondensedModel:
    """Time the whole condensed model against the dense one; all dense if it is not clearly faster."""
    xs = [jax.tree.map(lambda s: _random_input(s.shape, s.dtype, 1), a) for a in structs]
    dense_fn = jax.jit(lambda v, *a: fast.model.apply(v, *a, **apply_kwargs))
    fast_fn = jax.jit(lambda f, *a: f(*a, **apply_kwargs))
    t = _time_interleaved({"dense": lambda: dense_fn(variables, *xs), "condensed": lambda: fast_fn(fast, *xs)},
                          timing)
    ratio = float(np.median(t["dense"]) / np.median(t["condensed"]))
    wins = float(np.mean(t["condensed"] < t["dense"]))
    if ratio >= 1.0 and wins >= 0.5:
        return fast
    choices, model_params = [], variables["params"]
    for c in fast.choices:
        if c.kernel != DENSE.name and c.times_us:  # measured choices fall back; kernels= overrides stay
            c = dataclasses.replace(c, kernel=DENSE.name, reason=f"whole model only {ratio:.2f}x dense (wins "
                                    f"{wins:.0%}): measured layers dense; was {c.kernel}: {c.reason}")
        elif c.kernel != DENSE.name:
            model_params = set_path(model_params, c.path, get_path(fast.variables["params"], c.path))
        choices.append(c)
    return CondensedModel({**variables, "params": model_params}, fast.model, tuple(choices))


# --------------------------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------------------------
class Index(nnx.Variable):
    """Integer state of a condensed layer (indices, active neurons): not a trainable nnx.Param."""


class CondensedLayer(nnx.Module):
    """An nnx.Linear / nnx.Conv replaced by a kernel of :mod:`srigl_jax.inference.kernels` (from :func:`condense`).

    Float arrays of the kernel's variables are ``nnx.Param``, integer ones :class:`Index`.
    """

    def __init__(self, kernel: str, call: LayerCall, variables: Mapping[str, Array]):
        self.kernel_name = kernel
        self.call = call
        self.names = tuple(sorted(variables))
        for name, value in variables.items():
            cls = Index if jnp.issubdtype(value.dtype, jnp.integer) else nnx.Param
            setattr(self, name, cls(value))

    def __call__(self, x: Array) -> Array:
        v = {name: getattr(self, name)[...] for name in self.names}
        return KERNELS[self.kernel_name].apply(v, x, self.call)


def _nnx_parent_set(root: Any, path: tuple, value: Any) -> None:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int) or not hasattr(parent, str(key)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _nnx_kernel_shape(module: nnx.Module) -> tuple[int, ...]:
    """The kernel shape an nnx.Linear / nnx.Conv computes with (one slice of a stacked module's kernel)."""
    if isinstance(module, nnx.Linear):
        return (module.in_features, module.out_features)
    window = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    return (*window, module.in_features // module.feature_group_count, module.out_features)


def _condense_nnx(module: nnx.Module, masks: Any, *, kernels: Mapping[str, str] | None,
                  stack_axes: Mapping[str, Axes] | None, neuron_axes: Mapping[str, Axes] | None,
                  ) -> tuple[nnx.Module, tuple[LayerChoice, ...]]:
    """A copy of ``module`` with its sparse nnx.Linear / nnx.Conv layers replaced (fixed rule or override).
    A stacked module (``nnx.vmap``-created, run by ``nnx.scan`` / ``nnx.vmap``) is replaced by one
    :class:`CondensedLayer` holding every slice's variables stacked on the leading axes."""
    _check_kernel_names(kernels)
    module = nnx.clone(module)
    params = _nested(named_leaves(nnx.state(module, nnx.Param))[0])
    mask_tree = _nested(named_leaves(masks)[0])
    layers = _layers(params, mask_tree, stack_axes=stack_axes, neuron_axes=neuron_axes, kernels=kernels)
    modules = {"/".join(str(p) for p in path): (path, node) for path, node in nnx.iter_graph(module)
               if isinstance(node, (nnx.Linear, nnx.Conv))}
    choices = []
    for path, layer in layers.items():
        found = modules.get(path)
        call = layer_call(found[1]) if found else "not an nnx.Linear / nnx.Conv"
        override = _override(path, kernels)
        record = _record(layer, type(found[1]).__name__ if found else "", ())
        reason = call if isinstance(call, str) else layer.reason
        if override == DENSE.name or (reason and override in (None, AUTO)):
            choices.append(LayerChoice(**record, kernel=DENSE.name, reason=reason or "kernels= override"))
            continue
        _check_module_kernel(layer, record["module"], _nnx_kernel_shape(found[1]))
        if override not in (None, AUTO):
            why = reason or KERNELS[override].unsupported(call, layer.stats, layer.kernel.dtype)
            if why:
                raise ValueError(f"kernels=: layer {path!r} cannot run {override!r}: {why}")
            name, why = override, "kernels= override"
        else:
            name, why = _static_choice(layer, call, layer.kernel.dtype), "fixed rule (NNX: no measurement)"
        choices.append(LayerChoice(**record, kernel=name, reason=why))
        if name != DENSE.name:
            _nnx_parent_set(module, found[0], CondensedLayer(name, call, _prepare(layer, name, call)))
    return module, tuple(choices)


def _nested(flat: Sequence[tuple[str, Any]]) -> Params:
    out: Params = {}
    for path, leaf in flat:
        node = out
        *heads, last = path.split("/")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = leaf
    return out


# --------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------
def condense(model: nn.Module | nnx.Module, *trees: Any, example: Any = None,
             apply_kwargs: Mapping[str, Any] | None = None, batch_size: int | None = None,
             kernels: Mapping[str, str] | None = None, timing: Timing = Timing(), check_model: bool = True,
             stack_axes: Mapping[str, Axes] | None = None, neuron_axes: Mapping[str, Axes] | None = None,
             progress: bool = True) -> CondensedModel | nnx.Module:
    """Run a trained constant fan-in model fast: every sparse layer by the kernel that is fastest for it.

    Linen: ``condense(model, variables, masks, example=x, apply_kwargs={"train": False})`` returns a
    :class:`CondensedModel` ``fast`` with ``fast(x, train=False) == model.apply(variables, x, train=False)``.
    NNX: ``condense(module, masks)`` returns a copy of ``module`` whose sparse nnx.Linear / nnx.Conv layers are
    :class:`CondensedLayer` modules (fixed rule or ``kernels=``; the choices in its ``condense_choices``).

    Args:
      masks: boolean masks with the structure of ``variables["params"]`` (``nnx.state(module, nnx.Param)``).
      example: the model's positional input(s) (arrays or ``jax.ShapeDtypeStruct``; a tuple for several).
        With it, kernels are chosen by measuring each layer on its own input shape; without it by a fixed rule.
      apply_kwargs: keyword arguments of the model call used for the abstract pass and the timings.
      batch_size: measure at this batch size (the leading axis of every example input is replaced).
      kernels: ``{regex: kernel name}`` (re.search on the layer path): "dense", "structured",
        "condensed_ffi", "condensed_xla", "conv_patches_ffi", "conv_patches_xla", "conv_direct_ffi",
        "conv_direct_xla", any registered kernel (``KERNELS``), or "auto". A sparse layer the named kernel cannot
        run is an error; dense-mask layers run as they are.
      timing: repetitions, budget and the margin a kernel must beat dense by (:class:`Timing`).
      check_model: after the per-layer choice, time the whole model and fall back to dense if it is slower.
      stack_axes, neuron_axes: the layout declarations given to training (``sj.SRigL(stack_axes=...)``; see
        :mod:`srigl_jax.layout`), e.g. ``stack_axes={"blocks/": 0}`` for ``nn.scan`` / ``nnx.vmap`` blocks: each
        slice is condensed with its own active neurons and k', padded exactly to the largest slice, and the
        stacked variables replace the layer's params, so the model's scan runs them slice by slice.
      progress: a progress bar (tqdm, on stderr or in the notebook) while the kernels are timed.

    Errors: a masks tree lacking a layer (KeyError naming the tree and path), non-boolean masks, a sparse
    kernel whose layout is ambiguous (a 3-D kernel: declare it as in training), a model layer that cannot be
    matched to its mask (a stacked layer without its ``stack_axes`` declaration; or run it as it is with
    ``kernels={path: "dense"}``).
    Layers that are dense, not constant fan-in, not nn.Dense / nn.Conv / nn.DenseGeneral calls, or hold
    nonzero weights outside their mask run as they are (the choice records why).
    """
    if isinstance(model, nnx.Module):
        if len(trees) != 1:
            raise TypeError("condense(nnx_module, masks): pass exactly the masks")
        fast, choices = _condense_nnx(model, trees[0], kernels=kernels, stack_axes=stack_axes,
                                      neuron_axes=neuron_axes)
        fast.condense_choices = choices
        return fast
    if not isinstance(model, nn.Module):
        raise TypeError(f"condense: expected a flax linen or nnx Module, got {type(model).__name__}")
    if len(trees) != 2:
        raise TypeError("condense(linen_model, variables, masks): pass the variables and the masks")
    return _condense_linen(model, trees[0], trees[1], example=example, apply_kwargs=apply_kwargs,
                           batch_size=batch_size, kernels=kernels, timing=timing, check_model=check_model,
                           stack_axes=stack_axes, neuron_axes=neuron_axes, progress=progress)
