"""Two-process torchrun (gloo) training equals one process on the same global batch, to float rounding.

The data loader gives each of N ranks ``batch_size / N`` samples of every global batch (the union is the
single process's batch) and DDP averages the ranks' gradients, so with a model without BatchNorm (whose
per-rank batch statistics would legitimately differ) and no dropout, two processes must end with the
single process's weights. The optimiser is SGD: Adam would hide gradients that are summed instead of
averaged (its update is invariant to the gradient's scale). A training set that is a multiple of the
global batch keeps every step's shards equal in size (else DDP's mean of per-rank means is not the mean).

This file is also the worker: ``python tests/test_distributed.py <bsnn cli args>`` registers a small MLP and
runs ``bsnn.cli.main`` — alone, or under ``torch.distributed.run``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).resolve())
ARGS = ["data.name=digits", "data.batch_size=32", "data.limit_train=256", "data.limit_test=64",
        "data.val_fraction=0.0", "model.teacher=ddp_test_mlp", "train.epochs=2", "train.optimizer=sgd",
        "train.lr=0.1", "train.momentum=0.9", "train.weight_decay=0.0001", "--quiet"]


ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _cli(prefix: list[str], *args: str) -> None:
    """Run the worker's ``bsnn`` CLI (one process, or ``TWO`` under torchrun); it must succeed."""
    proc = subprocess.run([*prefix, WORKER, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train(prefix: list[str], out: Path) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*prefix, WORKER, "train", "--out", str(out), *ARGS], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(out / "teacher.pt", map_location="cpu", weights_only=True)
    return ck["state_dict"], json.loads((out / "metrics.json").read_text())["teacher"]


def test_torchrun_two_processes_equal_one(tmp_path):
    one, m1 = _train([sys.executable], tmp_path / "one")
    two, m2 = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                     tmp_path / "two")
    assert one.keys() == two.keys()
    for k, a in one.items():  # float32 sums in a different order: ~1e-7 relative; a broken mean moves ~1e-1
        torch.testing.assert_close(two[k], a, rtol=1e-5, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")
    h1, h2 = m1["history"], m2["history"]
    assert len(h1) == len(h2) == 2
    for e1, e2 in zip(h1, h2):  # training metrics are summed over the ranks: same loss and accuracy
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-4), (e1, e2)
        assert e2["train_acc"] == pytest.approx(e1["train_acc"], abs=1e-9), (e1, e2)
    assert m2["test_acc"] == pytest.approx(m1["test_acc"], abs=1e-9)


def test_torchrun_simulation_shards_the_test_set_and_equals_one_process(tmp_path):
    """``bsnn simulate`` under torchrun deals the test batches to 2 gloo ranks and reduces the counts: accuracy at
    every T, spike counts and recorded predictions equal the single process's exactly."""
    import shutil

    one = tmp_path / "one"
    run = [*ARGS[:-1], "model.student=ddp_test_mlp", "student.epochs=1", "train.epochs=1", "data.limit_test=200",
           "data.eval_batch_size=32", "simulate.timesteps=[1,2,4,8]", "simulate.record_predictions=true",
           "cost.enabled=false", "--quiet"]
    _cli(ONE, "run", "--out", str(one), *run)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    _cli(TWO, "simulate", "--out", str(two), "--overwrite", *run[-4:])
    a, b = (json.loads((d / "sweep.json").read_text()) for d in (one, two))
    assert a["samples"] == b["samples"] == 200
    assert a["accuracy"] == b["accuracy"] and a["ann_accuracy"] == b["ann_accuracy"]
    assert a["spike_counts"] == b["spike_counts"] and a["neurons"] == b["neurons"]
    ea, eb = ((d / "sweep_early_exit.csv").read_text() for d in (one, two))  # built from every sample's predictions
    assert ea == eb and len(ea.splitlines()) > 1



def test_torchrun_conversion_shards_the_calibration_and_equals_one_process(tmp_path):
    """``bsnn convert`` under torchrun: every rank converts, the percentile search's and the SNN calibration's
    simulations dealt to 2 gloo ranks (100 calibration samples: four chunks of 32, the last one short); the saved
    network equals the single process's bit for bit, and so does a whole ``bsnn run`` (no rank waits in a barrier
    while rank 0 converts)."""
    import shutil

    base = tmp_path / "base"
    run = [*ARGS[:-1], "model.student=ddp_test_mlp", "student.epochs=1", "train.epochs=1", "data.limit_test=64",
           "simulate.timesteps=[1,4,8]", "cost.enabled=false", "convert.snn_calibration_samples=100",
           "convert.search_percentiles=[99.0,100]", "convert.search_samples=96", "convert.search_timesteps=4",
           "--quiet"]
    _cli(ONE, "run", "--out", str(base), *run)
    two = tmp_path / "two"
    shutil.copytree(base, two)
    _cli(TWO, "convert", "--out", str(two), "--overwrite", "--quiet")
    full = tmp_path / "full"
    _cli(TWO, "run", "--out", str(full), *run)
    # the 2-rank run trained its own student (DDP: equal to float rounding only); convert it in one process too
    full_one = tmp_path / "full_one"
    shutil.copytree(full, full_one)
    _cli(ONE, "convert", "--out", str(full_one), "--overwrite", "--quiet")
    for one, many in ((base, two), (full_one, full)):
        a, b = (torch.load(d / "snn.pt", map_location="cpu", weights_only=True) for d in (one, many))
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), (many.name, k)
        assert a["snn_meta"]["snn_calibration_error"] == b["snn_meta"]["snn_calibration_error"]
        assert a["snn_meta"]["threshold_search"] == b["snn_meta"]["threshold_search"]


if __name__ == "__main__":
    from torch import nn

    from bsnn.cli import main
    from bsnn.models.registry import MODELS

    @MODELS.register("ddp_test_mlp")
    def _mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 48), nn.ReLU(), nn.Linear(48, num_classes))

    sys.exit(main(sys.argv[1:]))
