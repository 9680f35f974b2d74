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
    assert 0 <= m["student"]["teacher_agreement"] <= 100 and m["student"]["teacher_kl"] >= 0  # fidelity
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
    assert "test average T" in (run_dir / "sweep_early_exit.md").read_text()
    ee = json.loads((run_dir / "metrics.json").read_text())["early_exit"]
    assert ee["selected_on"] == "validation split" and all(r["val_accuracy"] is not None for r in curve)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "student.pt"), "data.name=digits"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["student"]["test_acc"])


def test_saved_snn_round_trip(run_dir, tmp_path):
    """save_snn -> load_snn reproduces the converted network exactly: every parameter and buffer (thresholds,
    v_init_bias, i_bias, ...) and the output membrane at every T, bit for bit."""
    from bsnn.config import load_config
    from bsnn.convert import convert
    from bsnn.data import build_splits, calibration_loader
    from bsnn.pipeline import save_snn

    snn, record = load_snn(run_dir / "snn.pt")  # what the CLI wrote: binary layers hold exactly ±1
    assert record["arch"]["binary"] is not None
    binary = [l["name"] for l in snn.layers if l["binary"]]
    assert binary and all(set(snn.synaptic_modules()[n].weight.unique().tolist()) == {-1.0, 1.0} for n in binary)

    cfg = load_config(run_dir / "config.yaml")
    student, ck = load_model(run_dir / "student.pt")
    splits = build_splits(cfg.data)
    saved = convert(student.eval(), calibration_loader(splits, cfg.data, cfg.convert.calib_samples), cfg.convert)
    ns = saved.neurons()
    assert any(bool(n.i_bias.any() or n.v_init_bias.any()) for n in ns.values())  # calibration left a trace
    g = torch.Generator().manual_seed(0)
    for n in ns.values():  # the calibration mode sets one of the two corrections; give the other values too
        for buf in (n.v_init_bias, n.i_bias):
            if not buf.any():
                buf.copy_(0.01 * torch.randn(buf.shape, generator=g))
    save_snn(tmp_path / "snn.pt", saved, ck["arch"])
    loaded, _ = load_snn(tmp_path / "snn.pt")

    assert loaded.neuron_names == saved.neuron_names and loaded.layers == saved.layers
    nl = loaded.neurons()
    for name in ns:
        for buf in ("threshold", "v_init_frac", "v_init_bias", "i_bias"):
            assert torch.equal(getattr(nl[name], buf), getattr(ns[name], buf)), (name, buf)
    a, b = dict(saved.named_parameters()), dict(loaded.named_parameters())
    a.update(saved.named_buffers())
    b.update(loaded.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.stack([splits.test[i][0] for i in range(64)])
    with torch.no_grad():
        for t, chunk in ((1, 1), (5, 2), (32, 16)):
            assert torch.equal(run_batch(loaded, x, t, chunk), run_batch(saved, x, t, chunk)), t


def test_distill_another_method_from_the_runs_teacher(run_dir, tmp_path, capsys):
    """`bsnn distill` reuses the folder's teacher: only the teacher's sections must match."""
    assert main(["distill", "--out", str(run_dir), *FAST, "distill.method=dkd", "student.epochs=1"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["student"]["history"]) == 1
    assert main(["distill", "--out", str(run_dir), *FAST, "train.epochs=5"]) == 2
    assert "other train settings" in capsys.readouterr().err
    # the new student made the folder's snn.pt (converted from the old one) stale: it is gone until re-converted
    assert not (run_dir / "snn.pt").exists() and "snn" not in json.loads((run_dir / "metrics.json").read_text())
    # without --config and overrides, the run folder's own config is the base (data.name=digits is kept)
    assert main(["convert", "--out", str(run_dir), "--quiet"]) == 0
    assert main(["simulate", "--out", str(run_dir), "--timesteps", "1,2", "--quiet"]) == 0


def test_config_error_exit_code(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "x"), "train.epochs=0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err


def test_list_methods(capsys):
    assert main(["distill", "--list-methods"]) == 0
    assert "kd" in capsys.readouterr().out.split()
