"""Build of the optional C++ kernel (srigl_jax/csrc -> srigl_jax/_condensed_kernel*.so, an XLA FFI target).

Metadata lives in pyproject.toml. The extension is optional: if jaxlib's FFI headers or a C++17 compiler are
missing, or the compile fails, the install still succeeds and srigl_jax.inference uses its pure-XLA path.
Set SRIGL_JAX_NO_KERNEL=1 to skip the compile.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include_dir() -> str | None:
    try:
        import jax.ffi

        return jax.ffi.include_dir()
    except Exception:  # jax missing or too old: fall back to jaxlib's bundled headers
        pass
    try:
        import jaxlib

        path = os.path.join(os.path.dirname(jaxlib.__file__), "include")
        return path if os.path.isdir(path) else None
    except Exception:
        return None


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the kernel is an accelerator, never a requirement."""

    def build_extension(self, ext):
        if os.environ.get("SRIGL_JAX_NO_KERNEL", "") not in ("", "0"):
            self._skip(ext, "SRIGL_JAX_NO_KERNEL is set")
            return
        include = _ffi_include_dir()
        if include is None or not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
            self._skip(ext, "XLA FFI headers not found (jaxlib not importable in the build environment)")
            return
        ext.include_dirs.append(include)
        try:
            super().build_extension(ext)
        except Exception as err:  # compiler missing or compile error
            self._skip(ext, f"compile failed: {err}")

    @staticmethod
    def _skip(ext, reason):
        print(f"WARNING: not building optional kernel {ext.name}: {reason}. "
              "srigl_jax.inference will use its pure-XLA path.", file=sys.stderr)


kernel = Extension(
    "srigl_jax._condensed_kernel",
    sources=["srigl_jax/csrc/condensed_kernel.cc"],
    depends=["srigl_jax/csrc/condensed_kernel_impl.inc", "srigl_jax/csrc/condensed_conv.h",
             "srigl_jax/csrc/condensed_conv_impl.inc", "srigl_jax/csrc/condensed_conv_ffi.inc",
             "srigl_jax/csrc/top_select_ffi.inc"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-Wno-psabi", "-Wno-attributes"],
    optional=True,
)

setup(ext_modules=[kernel], cmdclass={"build_ext": OptionalBuildExt})
