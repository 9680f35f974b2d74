"""Two-process torchrun (gloo) training matches one process: the union of the ranks' batches is the single
process's batch and DDP averages gradients, so only BatchNorm's per-rank batch statistics differ."""

import subprocess
import sys

import pytest
import torch

from bsnn.io import load_checkpoint

pytestmark = pytest.mark.distributed

ARGS = ["data.name=digits", "data.batch_size=32", "train.epochs=2", "train.lr=0.003", "model.kwargs={dropout: 0.0}",
        "--quiet"]


def _run(prefix: list[str], out) -> dict:
    subprocess.run([*prefix, "train", "--out", str(out), *ARGS], check=True, capture_output=True, text=True,
                   timeout=300)
    return load_checkpoint(out / "teacher.pt")["state_dict"]


def test_torchrun_two_processes_match_one(tmp_path):
    one = _run([sys.executable, "-m", "bsnn.cli"], tmp_path / "one")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "bsnn.cli"], tmp_path / "two")
    assert one.keys() == two.keys()
    for k, a in one.items():
        if a.dim() > 1:  # conv/linear weights; BN statistics legitimately differ (per-rank batches of 16 vs 32)
            cos = torch.nn.functional.cosine_similarity(a.flatten(), two[k].flatten(), dim=0)
            assert cos > 0.9, (k, cos.item())
    import json

    acc = [json.loads((tmp_path / d / "metrics.json").read_text())["teacher"]["test_acc"] for d in ("one", "two")]
    assert abs(acc[0] - acc[1]) < 3.0, acc
