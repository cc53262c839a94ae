"""The reduced-scale reproductions (train/reproduce.py): report arithmetic by hand, the stage logic, and the CIFAR-10
study end to end (a tiny version in CI, a 2-method miniature of the real preset under ``slow``)."""
import json

import numpy as np
import pytest

from tests import real_data_files
from train import data as data_lib
from train import reproduce
from train.reproduce import CIFAR10, MNIST_GAP, cells, markdown_table, run_study, write_report

pytestmark = pytest.mark.usefixtures("compile_cache")


def _summary(method, sparsity, seed, acc, active=1.0, label=None, fan=(5, 5)):
    layers = {"conv/kernel": {"dense": False, "fan_in_min": fan[0], "fan_in": fan[1], "active_neurons": 8,
                              "n_neurons": 8},
              "head/kernel": {"dense": True, "fan_in_min": 64, "fan_in": 64, "active_neurons": 10, "n_neurons": 10}}
    return {"method": method, "sparsity": sparsity, "seed": seed, "test_accuracy": acc,
            "active_neuron_fraction": active, "itop_rate": 0.25, "train_seconds": 1.0, "layers": layers,
            "label": label or reproduce.METHOD_LABELS[method], "stage_overrides": {}}


def test_cells_mean_and_spread_by_hand():
    runs = [_summary("rigl", 0.99, 1, 0.82, fan=(1, 9)), _summary("rigl", 0.99, 0, 0.80, fan=(2, 7)),
            _summary("dense", 0.0, 0, 0.90)]
    (rigl,) = [c for c in cells(runs) if c["method"] == "rigl"]
    assert rigl["seeds"] == [0, 1] and rigl["test_accuracy"] == pytest.approx([80.0, 82.0])
    assert rigl["test_accuracy_mean"] == pytest.approx(81.0)
    assert rigl["test_accuracy_std"] == pytest.approx(np.sqrt(2.0))  # sample std of 80, 82
    assert rigl["fan_in"] == {"conv/kernel": [2, 7, 8, 8]}  # the first seed's run; dense layers left out


def test_table_sets_the_papers_numbers_beside_the_same_method_only():
    runs = [_summary("srigl", 0.99, 0, 0.70), _summary("dense", 0.0, 0, 0.90),
            _summary("srigl", 0.99, 0, 0.75, active=0.5, label="SRigL gamma_sal 0.95")]
    runs[2]["stage_overrides"] = {"gamma_sal": 0.95}
    lines = markdown_table(CIFAR10, cells(runs)).splitlines()
    assert lines[0].endswith("| paper ResNet-18 | paper WRN-22-2 |")
    dense, srigl, variant = lines[2:]
    assert dense.startswith("| dense | 0 | 1 | 90.00 +- 0.00 |") and dense.endswith("| 95.5 | 95.0 |")
    assert srigl.startswith("| SRigL | 0.99 | 1 | 70.00 +- 0.00 | 100.0 |") and srigl.endswith("| 92.8 | 82.7 |")
    assert variant.startswith("| SRigL gamma_sal 0.95 | 0.99 | 1 | 75.00 +- 0.00 | 50.0 |")
    assert variant.endswith("|  |  |")  # not the paper's setting: no number beside it
    assert "paper" not in markdown_table(MNIST_GAP, cells(runs))


def test_the_gamma_stage_is_needed_only_when_srigl_ablated_nothing():
    ablated_nothing = reproduce._srigl_ablated_nothing
    assert not ablated_nothing([])  # nothing known yet
    assert ablated_nothing([_summary("srigl", 0.99, 0, 0.7), _summary("rigl", 0.99, 0, 0.7, active=0.9)])
    assert not ablated_nothing([_summary("srigl", 0.99, 0, 0.7), _summary("srigl", 0.9, 0, 0.7, active=0.98)])
    # 2 neurons of 1200 (the first real run): the threshold has not changed the method, the variant is needed
    assert ablated_nothing([_summary("srigl", 0.99, 0, 0.7, active=1 - 2 / 1200)])
    assert not ablated_nothing([_summary("srigl", 0.99, 0, 0.7, active=1 - reproduce.NEGLIGIBLE_ABLATION)])
    gamma_stages = [stage for stage in CIFAR10.stages if stage.when is not None]
    assert gamma_stages and all(stage.when is ablated_nothing and stage.overrides == {"gamma_sal": 0.95}
                                for stage in gamma_stages)
    # every gamma_sal 0.95 cell of the grid is covered, at 99% on both seeds
    covered = {(sp, seed) for stage in gamma_stages for sp in stage.sparsities for seed in stage.seeds}
    assert covered == {(0.99, 0), (0.99, 1), (0.9, 0), (0.95, 0)}


def _need_cifar10():
    try:
        data_lib.find_cifar10_tarball(None)
    except data_lib.DataError:
        pytest.skip("CIFAR-10 tarball not found in ../shared/data")


def _check_study_outputs(out, results, record):
    by_label = {c["label"]: c for c in record["cells"]}
    # 0.3 ablates nothing in a few steps, so the study added the gamma_sal 0.95 variant on its own
    assert set(by_label) == {"RigL", "SRigL", "SRigL gamma_sal 0.95"}
    assert all(c["sparsity"] == 0.9 and c["seeds"] == [0] for c in by_label.values())
    for label in ("SRigL", "SRigL gamma_sal 0.95"):  # constant fan-in per layer, whatever the training did
        assert all(lo == hi for lo, hi, *_ in by_label[label]["fan_in"].values())
    assert record["paper"]["ResNet-18"]["0.99"]["srigl"] == 92.8
    assert json.loads(results.with_suffix(".json").read_text()) == json.loads(json.dumps(record))
    assert results.with_suffix(".png").stat().st_size > 10_000
    assert (out / "gamma0.95" / "srigl-0.9-s0" / "summary.json").is_file()


def test_tiny_cifar10_study_end_to_end_and_resumed_without_retraining(tmp_path, monkeypatch):
    """The real study's stages with a small CNN, 2 steps on a 300-image sample of the shipped CIFAR-10 (CI's
    version of the slow test below)."""
    if real_data_files.shipped_tarball() is None:
        pytest.skip("CIFAR-10 tarball not found in ../shared/data")
    real_data_files.write_cifar_python_folder(tmp_path / "data", real_data_files.shipped_cifar_sample())
    out, results = tmp_path / "runs", tmp_path / "report" / "cifar10"
    tiny = dict(steps=2, batch_size=32, model="cnn", model_kwargs={"channels": [4, 8], "hidden": 16},
                data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    summaries = run_study(CIFAR10, out, methods=["rigl", "srigl"], sparsities=[0.9], seeds=[0], **tiny)
    _check_study_outputs(out, results, write_report(CIFAR10, summaries, results))

    import train.loop

    def no_training(cfg):
        raise AssertionError(f"{cfg.workdir} was finished and must not be trained again")

    monkeypatch.setattr(train.loop, "train", no_training)
    again = run_study(CIFAR10, out, methods=["rigl", "srigl"], sparsities=[0.9], seeds=[0], **tiny)
    assert again == summaries


@pytest.mark.slow
def test_cifar10_study_miniature_through_the_command(tmp_path, capsys):
    """A 2-method, 1-sparsity miniature of the real preset (width 16), through ``python -m train.reproduce``."""
    _need_cifar10()
    out, results = tmp_path / "runs", tmp_path / "report" / "cifar10"
    assert reproduce.main(["cifar10", "--methods", "rigl", "srigl", "--sparsities", "0.9", "--seeds", "0",
                           "--steps", "30", "--out", str(out), "--results", str(results)]) == 0
    record = json.loads(results.with_suffix(".json").read_text())
    _check_study_outputs(out, results, record)
    assert all(c["test_accuracy_mean"] > 10.0 for c in record["cells"])  # above chance after 30 steps
    assert "| RigL | 0.9 | 1 |" in capsys.readouterr().out
