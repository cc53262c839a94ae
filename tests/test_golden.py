"""The update path pinned bit for bit: masks and params of every method over several mask updates, as produced
by the code when the golden file was written (see ``golden_update_path.py``). Any refactor of selection, rules,
plans, the driver or the optax side must keep this green."""

import numpy as np
import pytest

from tests import golden_update_path as golden


@pytest.fixture(scope="module")
def expected():
    with np.load(golden.GOLDEN_FILE) as data:
        return dict(data)


def assert_bitwise_equal(actual: dict, expected: dict, name: str) -> None:
    mine = {k: v for k, v in expected.items() if k.startswith(name + "/")}
    got = {f"{name}/{k}": v for k, v in actual.items()}
    assert sorted(got) == sorted(mine)
    for key, want in mine.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        # Compare bit patterns: -0.0 vs 0.0 or a different NaN would be a change too.
        assert np.array_equal(have.view(np.uint8), want.view(np.uint8)), f"{key} differs from the golden output"


@pytest.mark.parametrize("name", sorted(golden.SCENARIOS))
def test_sparse_apply_matches_golden(expected, name):
    out = golden.run_sparse_apply(name)
    assert_bitwise_equal(out, expected, name)


@pytest.mark.parametrize("name", sorted(golden.SCENARIOS))
def test_sparse_optimizer_matches_golden(expected, name):
    out = golden.run_sparse_optimizer(name)
    assert_bitwise_equal(out, expected, name)


def test_golden_scenarios_exercise_the_rules(expected):
    """The golden file is only worth something if its scenarios do what they claim: masks change at update
    steps, ablation removes neurons, the non-finite step changes nothing."""
    def fan_in(name, step, layer="Dense_0"):
        return expected[f"{name}/{step}/masks/{layer}/kernel"].reshape(-1, expected[
            f"{name}/{step}/masks/{layer}/kernel"].shape[-1]).sum(axis=0)

    assert (fan_in("srigl_ablation", "step8") == 0).any() and (fan_in("srigl_ablation", "init") > 0).all()
    assert not (fan_in("srigl_no_ablation", "step8") == 0).any()
    for name in golden.SCENARIOS:
        before = expected[f"{name}/step{golden.NONFINITE_STEP - 1}/params/Dense_0/kernel"]
        after = expected[f"{name}/step{golden.NONFINITE_STEP}/params/Dense_0/kernel"]
        assert expected[f"{name}/step{golden.NONFINITE_STEP}/nonfinite"]
        np.testing.assert_array_equal(before, after)
        changed = (expected[f"{name}/init/masks/Dense_0/kernel"] != expected[f"{name}/step8/masks/Dense_0/kernel"])
        assert changed.any() == (name != "static"), name
