import json
from pathlib import Path

import pytest
import torch

from bsnn.cli import main
from bsnn.pipeline import load_model, load_snn
from bsnn.simulate import run_batch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.name=digits", "train.epochs=2", "student.epochs=2", "convert.calib_samples=200",
        "simulate.timesteps=[1,4,16,32]", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--out", str(out), *FAST]) == 0
    return out


def test_run_writes_the_whole_pipeline(run_dir):
    for f in ("config.yaml", "log.txt", "metrics.json", "teacher.pt", "student.pt", "snn.pt", "sweep.md", "sweep.csv",
              "sweep.json", "sweep.png", "checkpoints/teacher_last.pt", "cost.json", "cost.md"):
        assert (run_dir / f).is_file(), f
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["teacher"]["test_acc"] > 70 and m["student"]["test_acc"] > 50
    assert set(m["snn"]["accuracy"]) == {"1", "4", "16", "32"}
    assert len(m["teacher"]["history"]) == 2
    assert m["cost"]["mode"] == "event_driven" and m["cost"]["total"]["energy_pj"] > 0


def test_cost_command_reproduces_spikesim_vgg9(tmp_path):
    assert main(["cost", "--preset", "spikesim-rram-65nm", "--layers", str(ROOT / "configs/hardware/vgg9_cifar10_layers.csv"),
                 "--xbar", "64", "--timesteps", "5", "--mode", "dense", "--out", str(tmp_path)]) == 0
    total = json.loads((tmp_path / "cost.json").read_text())["total"]
    assert total["energy_pj"] == pytest.approx(15906934.03, rel=1e-9)
    assert total["latency_ns"] == pytest.approx(62832640, rel=1e-12)
    assert total["area_um2"] == pytest.approx(8425528.76, rel=1e-9)


def test_existing_run_refused_without_resume(run_dir, capsys):
    assert main(["run", "--out", str(run_dir), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_skips_finished_stages_and_rejects_changed_config(run_dir, capsys):
    before = (run_dir / "teacher.pt").stat().st_mtime_ns
    assert main(["run", "--out", str(run_dir), "--resume", *FAST]) == 0
    assert (run_dir / "teacher.pt").stat().st_mtime_ns == before
    assert main(["run", "--out", str(run_dir), "--resume", *FAST, "train.lr=0.5"]) == 2
    assert "other train settings" in capsys.readouterr().err


def test_convert_simulate_evaluate_commands(run_dir, capsys):
    assert main(["convert", "--out", str(run_dir), *FAST, "convert.threshold=max"]) == 0
    assert main(["simulate", "--out", str(run_dir), "--timesteps", "2,8", *FAST,
                 "simulate.constraints={xbar_rows: 16, adc_bits: 3, membrane_bits: 12}"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m["snn"]["accuracy"]) == {"2", "8"}
    assert set(m["snn_constrained"]["accuracy"]) == {"2", "8"}
    assert "with constraints" in (run_dir / "sweep_constrained.md").read_text()
    assert main(["simulate", "--out", str(run_dir), "--timesteps", "4,16", *FAST,
                 "simulate.record_predictions=true"]) == 0
    curve = json.loads((run_dir / "metrics.json").read_text())["early_exit"]["curve"]
    assert curve and all(1 <= r["mean_timesteps"] <= 16 for r in curve)
    assert "average timesteps" in (run_dir / "sweep_early_exit.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "student.pt"), "data.name=digits"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["student"]["test_acc"])


def test_saved_snn_round_trip(run_dir):
    snn, record = load_snn(run_dir / "snn.pt")
    student, _ = load_model(run_dir / "student.pt")
    assert record["arch"]["binary"] is not None
    binary = [l["name"] for l in snn.layers if l["binary"]]
    assert binary and all(set(snn.synaptic_modules()[n].weight.unique().tolist()) == {-1.0, 1.0} for n in binary)
    from bsnn.config import DataConfig
    from bsnn.data import build_loaders

    test = build_loaders(DataConfig(name="digits"), seed=0).splits.test
    x = torch.stack([test[i][0] for i in range(64)])  # in-distribution inputs (the SNN is calibrated on them)
    with torch.no_grad():
        mem = run_batch(snn, x, 64, 16)[-1]
        z = student.eval()(x)
    assert (mem.argmax(1) == z.argmax(1)).float().mean() >= 0.75


def test_distill_another_method_from_the_runs_teacher(run_dir, tmp_path, capsys):
    """`bsnn distill` reuses the folder's teacher: only the teacher's sections must match."""
    assert main(["distill", "--out", str(run_dir), *FAST, "distill.method=dkd", "student.epochs=1"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["student"]["history"]) == 1
    assert main(["distill", "--out", str(run_dir), *FAST, "train.epochs=5"]) == 2
    assert "other train settings" in capsys.readouterr().err
    # without --config and overrides, the run folder's own config is the base (data.name=digits is kept)
    assert main(["simulate", "--out", str(run_dir), "--timesteps", "1,2", "--quiet"]) == 0


def test_config_error_exit_code(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "x"), "train.epochs=0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err


def test_list_methods(capsys):
    assert main(["distill", "--list-methods"]) == 0
    assert "kd" in capsys.readouterr().out.split()
