"""Run folders: overwrite scope, the lock, stage records and provenance, integrity on load, write failures and
file modes (issue #12: nothing lost, nothing mixed, nothing silently wrong)."""

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import bsnn.io
import bsnn.pipeline
from bsnn.cli import main
from bsnn.errors import CheckpointError, DataError
from bsnn.io import CheckpointWarning, file_sha256, model_digest, save_checkpoint
from bsnn.config import load_config
from bsnn.pipeline import STUDENT_CONFIG, TEACHER_CONFIG, load_model, load_snn
from bsnn.runfolder import LATER_FIELDS, TEACHER_INDEPENDENT, config_digest, merge_fields

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "data.limit_train=256", "train.epochs=1", "student.epochs=1", "convert.calib_samples=64",
        "simulate.timesteps=[1,4]", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One whole run; tests that change a run work on their own copy (:func:`_copy`)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------- 1: overwrite scope
def test_distill_overwrite_keeps_the_teacher_it_distils_from(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    teacher = (run / "teacher.pt").read_bytes()
    assert main(["distill", "--out", str(run), "--overwrite", *TINY]) == 0
    assert (run / "teacher.pt").read_bytes() == teacher
    m = _metrics(run)
    assert {"teacher", "student"} <= set(m) and not {"convert", "snn", "cost"} & set(m)
    assert not any((run / f).exists() for f in ("snn.pt", "sweep.json", "sweep.png", "cost.json"))


def test_train_overwrite_removes_only_what_bsnn_wrote_for_that_stage_and_later(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    mine = [run / "mymodel.pt", run / "checkpoints" / "important.pt", run / "notes.txt"]
    for p in mine:
        p.write_text("keep me")
    assert main(["train", "--out", str(run), "--overwrite", *TINY]) == 0
    assert all(p.read_text() == "keep me" for p in mine)
    assert set(_metrics(run)) == {"teacher"}  # no student / SNN / cost entries of the replaced run
    gone = ["student.pt", "snn.pt", "checkpoints/student_last.pt", "sweep.md", "sweep.csv", "sweep.json", "sweep.png",
            "cost.json", "cost.md", "cost_breakdown.png", "cost_vs_T.png"]
    assert not [f for f in gone if (run / f).exists()]


def test_empty_out_and_folders_without_a_run_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    mine = [tmp_path / "mymodel.pt", tmp_path / "checkpoints" / "important.pt"]
    for p in mine:
        p.write_text("keep me")
    assert main(["train", "--out", "", "--overwrite", *TINY]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--overwrite", *TINY]) == 2
    assert "holds no bsnn run" in capsys.readouterr().err
    assert main(["train", "--out", ".", *TINY]) == 2
    assert all(p.read_text() == "keep me" for p in mine) and not (tmp_path / "config.yaml").exists()


# ----------------------------------------------------------------------------------------- 2: the lock
def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from bsnn.runfolder import LOCK_NAME, RunLock

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom bsnn.runfolder import RunLock\nRunLock(sys.argv[1]).acquire()\n"
                               "print('locked', flush=True)\ntime.sleep(300)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", "--out", str(run), "--overwrite", "run.seed=1", *TINY]) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid} on " in err and ", started 20" in err
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_NAME).is_file()  # kill -9 left it behind: stale, the flock went with the process
    lock = RunLock(run).acquire()
    try:
        assert lock.previous["pid"] == holder.pid
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------- 3: provenance
def test_every_derived_file_records_what_it_was_derived_from(tiny_run):
    teacher = load_model(tiny_run / "teacher.pt")[0]
    student, student_ck = load_model(tiny_run / "student.pt")
    snn, snn_ck = load_snn(tiny_run / "snn.pt")
    sweep = json.loads((tiny_run / "sweep.json").read_text())
    cost = json.loads((tiny_run / "cost.json").read_text())
    assert student_ck["derived_from"]["teacher"] == model_digest(teacher)
    assert snn_ck["derived_from"]["student"] == model_digest(student)
    assert sweep["derived_from"]["snn"] == model_digest(snn) == cost["derived_from"]["snn"]
    assert cost["derived_from"]["sweep.json"] == file_sha256(tiny_run / "sweep.json")
    for key, entry in _metrics(tiny_run).items():
        rec = entry["record"]
        assert rec["outputs"] and all(file_sha256(tiny_run / f) == h for f, h in rec["outputs"].items()), key
        assert rec["derived_from"]["config"], key


def test_a_reconverted_network_never_reuses_the_old_sweep(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    old_sweep = (run / "sweep.json").read_text()
    assert main(["convert", "--out", str(run), *TINY, "convert.snn_calibration=none"]) == 0
    m = _metrics(run)
    assert "convert" in m and not {"snn", "cost"} & set(m) and not (run / "sweep.json").exists()
    cost = ["cost", "--run", str(run), "--out", str(tmp_path / "cost"), "--mode", "event_driven", "--quiet"]
    assert main(cost) == 2
    assert "needs" in capsys.readouterr().err
    (run / "sweep.json").write_text(old_sweep)  # a stale sweep put back by hand is refused too
    assert main(cost) == 2
    assert "another snn.pt" in capsys.readouterr().err
    assert main(["simulate", "--out", str(run), *TINY]) == 0
    assert main(cost) == 0
    snn = load_snn(run / "snn.pt")[0]
    assert json.loads((tmp_path / "cost" / "cost.json").read_text())["derived_from"]["snn"] == model_digest(snn)


def test_cost_into_the_run_folder_commits_its_record(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    assert main(["cost", "--run", str(run), "--out", str(run), "--mode", "dense", "--quiet"]) == 0
    m = _metrics(run)
    assert m["cost"]["mode"] == "dense"
    assert file_sha256(run / "cost.json") == m["cost"]["record"]["outputs"]["cost.json"]


# ----------------------------------------------------------------------------------------- 4: commit order
class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs."""


def test_a_model_file_without_its_record_is_finished_on_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = bsnn.io._atomic_write_bytes

    def killed_at_metrics(path, data):
        if Path(path).name == "metrics.json":
            raise _Killed
        real(path, data)

    monkeypatch.setattr(bsnn.io, "_atomic_write_bytes", killed_at_metrics)
    with pytest.raises(_Killed):
        main(["train", "--out", str(run), *TINY])
    monkeypatch.setattr(bsnn.io, "_atomic_write_bytes", real)
    assert (run / "teacher.pt").is_file() and not (run / "metrics.json").exists()
    weights = load_model(run / "teacher.pt")[0].state_dict()
    assert main(["train", "--out", str(run), *TINY]) == 2  # partial work: the plain rerun points to --resume
    assert main(["train", "--out", str(run), "--resume", *TINY]) == 0
    teacher = _metrics(run)["teacher"]
    assert len(teacher["history"]) == 1
    assert teacher["record"]["outputs"]["teacher.pt"] == file_sha256(run / "teacher.pt")
    assert all(torch.equal(v, weights[k]) for k, v in load_model(run / "teacher.pt")[0].state_dict().items())


# ----------------------------------------------------------------------------------------- 6: integrity
def _binary_weight(snn) -> torch.Tensor:
    name = next(l["name"] for l in snn.layers if l["binary"])
    return snn.synaptic_modules()[name].weight.detach()


def test_a_checkpoint_corrupted_in_place_is_refused(tiny_run, tmp_path):
    path = tmp_path / "snn.pt"
    data = bytearray((tiny_run / "snn.pt").read_bytes())
    w = _binary_weight(load_snn(tiny_run / "snn.pt")[0]).contiguous().numpy().tobytes()
    at = data.find(w)
    assert at > 0
    data[at:at + 8] = torch.tensor([-4.0, -1.0078125]).numpy().tobytes()  # same size, values of the issue
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_snn(path)
    assert "weights_only" not in str(e.value) and "will likely succeed" not in str(e.value)

    data = bytearray((tiny_run / "snn.pt").read_bytes())  # damage the pickle instead of a tensor
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + 5:start + 9] = b"\xa7\xa7\xa7\xa7"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_snn(path)
    assert "weights_only" not in str(e.value) and "will likely succeed" not in str(e.value)


def test_binary_layers_must_hold_exactly_plus_minus_one(tiny_run, tmp_path):
    ck = torch.load(tiny_run / "snn.pt", weights_only=True)
    ck.pop(bsnn.io.INTEGRITY_KEY, None)
    snn = load_snn(tiny_run / "snn.pt")[0]
    name = next(l["name"] for l in snn.layers if l["binary"])
    w = _binary_weight(snn)
    key = next(k for k, v in ck["state_dict"].items() if v.shape == w.shape and torch.equal(v, w))
    ck["state_dict"][key].view(-1)[:2] = torch.tensor([-4.0, -1.0078])
    save_checkpoint(ck, tmp_path / "edited.pt")  # a valid hash over wrong values
    with pytest.raises(CheckpointError, match=f"binary layer {name!r} holds 2 weight"):
        load_snn(tmp_path / "edited.pt")


def test_files_without_a_stored_hash_load_with_a_warning(tiny_run, tmp_path):
    ck = torch.load(tiny_run / "student.pt", weights_only=True)
    ck.pop(bsnn.io.INTEGRITY_KEY, None)
    torch.save(ck, tmp_path / "old.pt")
    with pytest.warns(CheckpointWarning, match="no stored content hash"):
        model, _ = load_model(tmp_path / "old.pt")
    assert model_digest(model) == model_digest(load_model(tiny_run / "student.pt")[0])


# ----------------------------------------------------------------------------------------- 8: --out problems
def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--out", str(f), *TINY]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["train", "--out", str(f / "run"), *TINY]) == 2
    assert "which is a file" in capsys.readouterr().err


def test_full_disk_and_read_only_folders_are_one_clear_error(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["train", "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "config.yaml" in err and "free some disk space" in err
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", "--out", str(tmp_path / "ro"), *TINY]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_a_run_that_failed_before_any_stage_does_not_block_the_plain_rerun(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "new" / "run"

    def no_data(*a, **k):
        raise DataError("no data today")

    monkeypatch.setattr(bsnn.pipeline, "build_loaders", no_data)
    assert main(["train", "--out", str(run), *TINY]) == 2
    assert not (tmp_path / "new").exists()  # a refused command leaves no folder behind
    monkeypatch.undo()
    killed = tmp_path / "killed"  # a run killed (-9) before its first stage: config.yaml, log.txt, checkpoints/
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "config.yaml", killed / "config.yaml")
    (killed / "log.txt").write_text("09:00:00 INFO data digits\n")
    assert main(["train", "--out", str(killed), *TINY]) == 0


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_refused_command_leaves_the_run_folder_as_it_was(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    before = _snapshot(run)
    assert main(["convert", "--out", str(run), "--model", str(tmp_path / "missing.pt"), *TINY]) == 2
    assert main(["simulate", "--out", str(run), "--snn", str(run / "config.yaml"), *TINY]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_model_files_with_a_bad_architecture_record_are_refused(tiny_run, tmp_path):
    ck = torch.load(tiny_run / "student.pt", weights_only=True)
    ck.pop(bsnn.io.INTEGRITY_KEY, None)
    save_checkpoint({**ck, "arch": {}}, tmp_path / "empty_arch.pt")
    with pytest.raises(CheckpointError, match="architecture record .* must name name, num_classes, in_channels"):
        load_model(tmp_path / "empty_arch.pt")
    huge = {**ck["arch"], "kwargs": {**ck["arch"].get("kwargs", {}), "width": 2 ** 13}}
    save_checkpoint({**ck, "arch": huge}, tmp_path / "huge.pt")
    with pytest.raises(CheckpointError, match=r"asks for [\d,]+ parameters and buffers \([\d.]+ GB\).*nothing was "):
        load_model(tmp_path / "huge.pt")


def test_run_folder_files_keep_the_umask(tiny_run):
    mode = 0o666 & ~bsnn.io._umask()
    for f in ("config.yaml", "metrics.json", "teacher.pt", "snn.pt", "sweep.json", "cost.json", "log.txt"):
        assert (tiny_run / f).stat().st_mode & 0o777 == mode, f


def test_a_folder_from_before_records_still_converts_and_resumes(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    m = {k: {f: v for f, v in e.items() if f != "record"} for k, e in _metrics(run).items() if k != "convert"}
    (run / "metrics.json").write_text(json.dumps(m))
    assert main(["convert", "--out", str(run), *TINY]) == 0
    assert main(["run", "--out", str(run), "--resume", *TINY]) == 0
    assert _metrics(run)["teacher"]["test_acc"] == m["teacher"]["test_acc"]  # trusted, not retrained


def test_a_folder_written_before_later_fields_existed_still_resumes_and_reuses(tiny_run, tmp_path):
    """config.yaml without the fields added since (runfolder.LATER_FIELDS): the folder is reused and resumed, no
    model is retrained, because those fields at their defaults are left out of comparisons and digests."""
    run = _copy(tiny_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for section, fields in LATER_FIELDS.items():
        for k in fields:
            assert k in cfg[section]  # written by this version...
            del cfg[section][k]       # ...and absent from an older one
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = _metrics(run)
    assert main(["run", "--out", str(run), "--resume", *TINY]) == 0
    after = _metrics(run)
    for stage in ("teacher", "student"):
        assert after[stage]["record"] == before[stage]["record"], stage  # not retrained
    assert main(["convert", "--out", str(run), *TINY]) == 0


def test_a_folder_from_a_bsnn_without_newer_fields_resumes_twice_without_retraining(tiny_run, tmp_path):
    """Fields added after a folder was made, not listed anywhere: an older bsnn wrote a config.yaml without them and
    hashed its stage records without them. At their defaults they are what that run used: resume (twice) keeps its
    models, config.yaml keeps leaving them out; set to another value they are a real change and refused."""
    run = _copy(tiny_run, tmp_path)
    newer = {"data": ("augmentation",), "train": ("lookahead_decay", "nesterov"), "student": ("lookahead_decay",)}
    cfg = load_config(run / "config.yaml", [])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, fields in newer.items():
        for k in fields:
            del saved[section][k]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    metrics = _metrics(run)  # the records as the older bsnn would have hashed them
    metrics["teacher"]["record"]["derived_from"]["config"] = config_digest(
        cfg, TEACHER_CONFIG, merge_fields(TEACHER_INDEPENDENT, newer))
    metrics["student"]["record"]["derived_from"]["config"] = config_digest(cfg, STUDENT_CONFIG, newer)
    (run / "metrics.json").write_text(json.dumps(metrics))
    before = {s: (run / f"{s}.pt").read_bytes() for s in ("teacher", "student")}
    for _ in range(2):
        assert main(["run", "--out", str(run), "--resume", *TINY]) == 0
        after = _metrics(run)
        for stage in ("teacher", "student"):
            assert after[stage]["record"]["derived_from"] == metrics[stage]["record"]["derived_from"], stage
            assert (run / f"{stage}.pt").read_bytes() == before[stage], stage  # not retrained
        kept = yaml.safe_load((run / "config.yaml").read_text())
        assert all(k not in kept[s] for s, fields in newer.items() for k in fields)
    assert main(["train", "--out", str(run), "--resume", *TINY, "train.nesterov=true"]) == 2  # a real change
