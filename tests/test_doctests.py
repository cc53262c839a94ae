"""Every docstring example in the library runs (the README's examples run in test_readme.py)."""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import srigl_jax

# Python modules only (not the compiled kernel extension), subpackages (srigl_jax.inference) included
MODULES = sorted(m.name.removeprefix("srigl_jax.") for m in pkgutil.walk_packages(srigl_jax.__path__, "srigl_jax.")
                 if importlib.util.find_spec(m.name).origin.endswith(".py"))


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(f"srigl_jax.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in srigl_jax.{name}"


def test_the_examples_are_there():
    found = sum(doctest.testmod(importlib.import_module(f"srigl_jax.{n}"), report=False).attempted for n in ["optim"])
    assert found >= 10   # sparse_optimizer's and apply_masks' examples
