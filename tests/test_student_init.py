"""model.student_init: a student that starts from a trained one (e.g. QCFS fine-tuning of a ReLU student)."""

from __future__ import annotations

import json

import pytest
import torch

from bsnn.cli import main
from bsnn.config import load_config
from bsnn.convert.calibrate import Percentile, calibrate
from bsnn.data import calibration_loader
from bsnn.errors import ConfigError
from bsnn.modelfile import build_model, load_model
from bsnn.pipeline import STUDENT_INIT_CLIP_PERCENTILE, make_context, start_student_from

TINY = ["data.name=digits", "data.limit_train=256", "train.epochs=1", "student.epochs=1", "convert.calib_samples=64",
        "--quiet"]


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("relu") / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0 and main(["distill", "--out", str(out), *TINY]) == 0
    return out


def _ctx(tmp_path, *overrides):
    cfg = load_config(None, [o for o in TINY if o != "--quiet"] + ["run.quiet=true", f"run.out_dir={tmp_path / 'r'}",
                                                                  *overrides])
    return make_context(cfg)


def test_a_qcfs_student_starts_from_the_relu_weights_with_clips_at_its_activation_percentile(relu_run, tmp_path):
    source, record = load_model(relu_run / "student.pt")
    with _ctx(tmp_path, f"model.student_init={relu_run / 'student.pt'}", "model.activation=qcfs") as ctx:
        arch = ctx.arch("student")
        student = build_model(arch)
        out = start_student_from(ctx, student, arch)
        expected = calibrate(source, {n: source.get_submodule(n) for n in out["clips"]},
                             calibration_loader(ctx.loaders.splits, ctx.cfg.data, ctx.cfg.convert.calib_samples),
                             Percentile(STUDENT_INIT_CLIP_PERCENTILE))
    assert out["clips"] and set(out["clips"]) == {n for n, m in student.named_modules() if hasattr(m, "levels")
                                                 and hasattr(m, "clip")}
    for n, v in expected.items():
        assert float(student.get_submodule(n).clip.detach()) == pytest.approx(float(v))
    src = source.state_dict()
    for k, v in student.state_dict().items():
        if not k.endswith(".clip"):
            assert torch.equal(v, src[k]), k


def test_student_init_refuses_another_architecture(relu_run, tmp_path):
    with _ctx(tmp_path, f"model.student_init={relu_run / 'student.pt'}", "model.kwargs={width: 8}") as ctx:
        arch = ctx.arch("student")
        with pytest.raises(ConfigError, match="student_init.*kwargs"):
            start_student_from(ctx, build_model(arch), arch)
    with pytest.raises(ConfigError, match="student_init"):
        load_config(None, ["model.student_init=weights.bin"])


def test_a_run_records_the_weights_its_student_started_from(relu_run, tmp_path):
    out = tmp_path / "qcfs"
    assert main(["train", "--out", str(out), *TINY, "model.activation=qcfs"]) == 0
    assert main(["distill", "--out", str(out), *TINY, f"model.student_init={relu_run / 'student.pt'}",
                 "model.activation=qcfs"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    digest = m["student"]["record"]["derived_from"]["student_init"]
    assert isinstance(digest, str) and len(digest) == 64
    # resuming with the same source reuses the student; the teacher did not depend on the source
    assert main(["distill", "--out", str(out), "--resume", *TINY, f"model.student_init={relu_run / 'student.pt'}",
                 "model.activation=qcfs"]) == 0
