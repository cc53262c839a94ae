"""Every README code block marked ``<!-- test: run -->`` runs, in order, in one namespace (later blocks use
what earlier ones defined), so the examples a user copies cannot rot."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKED_BLOCK = re.compile(r"<!-- test: run -->\s*```python\n(.*?)```", re.S)


def test_marked_readme_blocks_run():
    blocks = MARKED_BLOCK.findall(README.read_text())
    assert len(blocks) >= 5, "the README's runnable examples went missing"
    namespace: dict = {"__name__": "readme"}
    out = io.StringIO()
    for i, code in enumerate(blocks):
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md block {i}", "exec"), namespace)
    printed = out.getvalue().splitlines()
    # the values the comments promise: 3 steps taken, constant fan-in k0 (ERK at 90%) on every neuron
    assert printed[0] == "3 [69 69 69 69 69]", printed
    assert printed[1].startswith("MaskUpdateInfo(updated=")
    # the stacked-layers section: 4 slices of 32 -> 32 with their own k0, per-slice fan-in, 2:4 blocks
    assert printed[2:5] == ["4 32 32 5", "(4, 32)", "2"], printed
    sj = namespace["sj"]
    assert int(sj.get_sparse_state(namespace["state"]).step) == 1   # TrainState.create made a fresh state
    kernel, mask = namespace["params"]["hidden"]["kernel"], namespace["masks"]["hidden"]["kernel"]
    assert not kernel[~mask].any()   # the pieces keep inactive weights at exactly 0


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the test command the README gives (its first lines and the Tests section)."""
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.startswith("python -m pytest")]
    assert len(commands) == 1, commands
    text = README.read_text()
    assert f"\n{commands[0]}\n```" in text            # "Two commands", what CI runs
    assert f"`{commands[0]}` (CI" in text               # the Tests section
