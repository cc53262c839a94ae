"""Fast inference for constant fan-in sparse models.

``ops`` (the condensed representation and its pure-XLA product; a leaf module), ``dispatch`` (C++ FFI kernel
or XLA), ``layers`` (which leaves are layers and their per-slice matrix views, through
:mod:`srigl_jax.layout`: the one place that decides), ``export`` (structured / condensed
exports of a params tree), ``modules`` (linen modules for exported params), ``kernels`` (the per-layer kernels
and their registry), ``condense`` (:func:`condense`: a whole unchanged linen or NNX model).
"""

from srigl_jax.inference.condense import CondensedLayer, CondensedModel, LayerChoice, Timing, condense, layer_call
from srigl_jax.inference.dispatch import FORCE_XLA_ENV, condensed_conv, condensed_linear, use_ffi_kernel
from srigl_jax.inference.export import (
    condense_kernel,
    condensed_variables,
    constant_fan_in,
    default_layer_order,
    densify,
    export_condensed,
    export_structured,
)
from srigl_jax.inference.kernels import KERNELS, Kernel, LayerCall, LayerStats, register_kernel
from srigl_jax.inference.modules import CondensedConv, CondensedDense
from srigl_jax.inference.ops import CondensedLinear, condensed_matmul_xla, extract_patches, index_dtype_for

__all__ = [
    "KERNELS",
    "CondensedLayer",
    "CondensedModel",
    "Kernel",
    "LayerCall",
    "LayerChoice",
    "LayerStats",
    "Timing",
    "condense",
    "layer_call",
    "register_kernel",
    "FORCE_XLA_ENV",
    "CondensedConv",
    "CondensedDense",
    "CondensedLinear",
    "condense_kernel",
    "condensed_conv",
    "condensed_linear",
    "condensed_matmul_xla",
    "condensed_variables",
    "constant_fan_in",
    "default_layer_order",
    "densify",
    "export_condensed",
    "export_structured",
    "extract_patches",
    "index_dtype_for",
    "use_ffi_kernel",
]
