"""The training CLI as a user meets it: one-line usage errors before anything is written, --help, none/list
values, and SIGINT/SIGTERM mid-run (a subprocess) that checkpoints, exits 130/143 and resumes bit-identically."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.__main__ import build_parser, main
from train.configs import DATASETS, MODEL_NAMES, MODES, Config, field_kind, get_config
from train.loop import make_algo, train
from train.models import MODELS, build_model
from train.steps import MODES as STEP_MODES
from train.testing import TINY_RUN as TINY
from train.testing import trees_equal

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("compile_cache")


def _flags(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


BAD = [  # (flags, what the one error line must contain)
    (["--sparsity", "1.0"], ["--sparsity 1.0", "allowed: a number in [0, 1)"]),
    (["--gamma-sal", "-1"], ["--gamma-sal -1", "allowed: a number >= 0, or none"]),
    (["--mode", "foo"], ["--mode foo", "allowed: single | pmap | sharded"]),
    (["--model", "nosuch"], ["--model nosuch", "allowed: mlp | cnn |"]),
    (["--steps", "abc"], ["--steps abc", "not an integer", "allowed: an integer >= 1, or none"]),
    (["--lr-decay-epochs", "three"], ["--lr-decay-epochs three", "allowed: numbers >= 0"]),
    (["--method", "magic"], ["--method magic", "allowed: dense | static"]),
    (["--config", "nope"], ["--config nope", "allowed: mnist_mlp |"]),
    (["--delta-t", "0"], ["--delta-t 0", "allowed: an integer >= 1"]),
    (["--optimizer", "adam"], ["--optimizer adam", "allowed: sgd | adamw"]),
    (["--lr-schedule", "linear"], ["--lr-schedule linear", "allowed: step | cosine | constant"]),
    (["--dataset", "svhn"], ["--dataset svhn", "allowed: mnist | cifar10 | imagenet2012"]),
    (["--augment", "maybe"], ["--augment maybe", "allowed: true or false"]),
    (["--lr", "nan"], ["--lr nan", "allowed: a number > 0"]),
    (["--steps", "none"], ["--steps none", "--epochs is none too"]),
    (["--steps", "5", "--epochs", "2"], ["--epochs 2", "not both"]),
    (["--sparsity-over", "sparse"], ["--sparsity-over sparse", "--distribution uniform"]),
    (["--grad-accumulation-steps", "8", "--delta-t", "4"], ["--grad-accumulation-steps 8", "[1, --delta-t=4]"]),
    (["--train-subset", "50", "--batch-size", "100"], ["--batch-size 100", "has 50 examples"]),
    (["--model-kwargs", '{"nope": 1}'], ['--model-kwargs {"nope": 1}', "unexpected keyword argument 'nope'"]),
    (["--model-kwargs", "[1]"], ["--model-kwargs [1]", "allowed: a JSON object"]),
    (["--model-kwargs", '{"hidden": "abc"}'], ["cannot build this run from its flags", "nothing was written"]),
    (["--bogus", "1"], ["unrecognized arguments: --bogus 1"]),
]


@pytest.mark.parametrize("flags,expected", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flag_is_a_one_line_usage_error_and_writes_nothing(tmp_path, capsys, flags, expected):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(flags + ["--workdir", str(workdir), "--progress", "false"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m train: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not workdir.exists() and list(tmp_path.iterdir()) == []


def test_workdir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", str(target), "--steps", "3"])
    assert exit_info.value.code == 2
    assert f"--workdir {target} is invalid (it is a file); allowed: a new or empty folder" in capsys.readouterr().err
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_folder_of_other_files_is_never_used_as_a_workdir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", str(tmp_path), "--steps", "3"])
    assert exit_info.value.code == 2
    assert "it holds other files (notes.txt) and no run" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_names_kept_here_match_the_code(monkeypatch):
    assert set(MODEL_NAMES) == set(MODELS) and tuple(MODES) == tuple(STEP_MODES)
    from train import data

    def no_files(*args, **kwargs):
        raise data.DataError("no files in this test")

    for loader in ("load_mnist", "load_cifar10", "load_imagenet_sources"):
        monkeypatch.setattr(data, loader, no_files)
    for name in DATASETS:  # every listed dataset is known to load_data (it fails on the files, not the name)
        with pytest.raises(data.DataError):
            data.load_data(name)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_data("svhn")


def test_none_unsets_optional_fields_and_single_numbers_are_lists():
    args = vars(build_parser().parse_args(["--gamma-sal", "none", "--lr-decay-epochs", "3", "--grad-clip-norm",
                                           "NONE", "--stop-after", "null", "--train-subset", "none"]))
    cfg = get_config(args.pop("config"), **args)
    assert cfg.gamma_sal is None and cfg.lr_decay_epochs == (3.0,) and cfg.grad_clip_norm is None
    assert cfg.stop_after is None and cfg.train_subset is None
    assert get_config("mnist_mlp", lr_decay_epochs=(1, 2)).lr_decay_epochs == (1, 2)
    optional = [f.name for f in dataclasses.fields(Config) if field_kind(f)[1]]
    assert "gamma_sal" in optional and len(optional) >= 9
    for name in optional:  # 'none' works for every optional field
        assert vars(build_parser().parse_args([f"--{name.replace('_', '-')}", "none"]))[name] is None
    for text, value in (("[77, 154]", (77.0, 154.0)), ("77,154", (77.0, 154.0)), ("[]", ()), ("", ())):
        assert vars(build_parser().parse_args(["--lr-decay-epochs", text]))["lr_decay_epochs"] == value
    # gamma_sal None = SRigL without ablation, the same algorithm as srigl_noablation
    _, spec = build_model("mlp")
    no_ablation = make_algo(cfg, spec, 100)
    assert repr(no_ablation) == repr(make_algo(get_config("mnist_mlp", method="srigl_noablation"), spec, 100))
    assert no_ablation.gamma_sal is None
    # --epochs alone replaces the preset's --steps
    assert get_config("mnist_mlp", epochs=2).steps is None


def test_help_lists_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--steps INT total training steps", "Default: 3000", "Allowed: single | pmap | sharded",
                     "--method dense|static|set|rigl|srigl|srigl_noablation", "Allowed: a number >= 0, or none",
                     "--extend", "recomputed for the new config", "Exit status"):
        assert expected in text, expected
    with pytest.raises(SystemExit):
        main(["--config", "cifar10_resnet18", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Defaults shown are those of --config cifar10_resnet18" in text and "Default: 250" in text


def test_signal_handlers_are_restored_after_training(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train(get_config("mnist_mlp", workdir=str(tmp_path / "run"), **{**TINY, "stop_after": 2}))
    assert {s: signal.getsignal(s) for s in before} == before


# The child slows every batch down (so that the signal lands mid-run) and otherwise is `python -m train`.
CHILD = """
import sys, time
from train import data
_next = data.BatchIterator.__next__
def slow_next(self):
    time.sleep(0.1)
    return _next(self)
data.BatchIterator.__next__ = slow_next
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return train(get_config("mnist_mlp", workdir=str(tmp_path_factory.mktemp("full") / "run"), **TINY))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_checkpoints_and_resumes_bit_identically(tmp_path, full_run, capsys, signum):
    workdir = tmp_path / "run"
    flags = _flags({**TINY, "workdir": workdir})
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *flags], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():  # step 4 logged: inside the training loop
            break
        time.sleep(0.02)
    assert child.poll() is None, child.communicate()
    child.send_signal(signum)
    out, err = child.communicate(timeout=240)
    assert child.returncode == 128 + signum, err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    line = next(line for line in err.splitlines() if line.startswith(f"interrupted by {name} at step "))
    step = int(line.split(" at step ")[1].split()[0])
    assert 4 <= step < 24
    assert f"checkpoint written to {workdir / 'checkpoints' / str(step)}" in line
    assert "Resume with:" in err and f"--workdir {workdir}" in err
    assert (workdir / "checkpoints" / str(step)).is_dir()
    records = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert records[-1]["step"] == step  # the interrupted step is logged too (nothing lost)
    assert not (workdir / "summary.json").exists()

    capsys.readouterr()
    resumed = train(get_config("mnist_mlp", workdir=str(workdir), **TINY))
    assert f"resuming from step {step} of 24 (checkpoint {workdir / 'checkpoints' / str(step)})" in \
        capsys.readouterr().err
    assert resumed.status == "finished"
    for field in ("step", "params", "opt_state"):
        assert trees_equal(getattr(full_run.state, field), getattr(resumed.state, field)), field
    assert trees_equal(full_run.state, resumed.state)  # masks and everything else too
    assert resumed.summary["test_accuracy"] == full_run.summary["test_accuracy"]
