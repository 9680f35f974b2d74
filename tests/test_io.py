import os
import pickle

import pytest
import torch

from bsnn.errors import CheckpointError
from bsnn.io import atomic_write_json, load_checkpoint, save_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BSNN_PWNED']}",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    monkeypatch.setenv("BSNN_PWNED", str(flag))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not flag.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not flag.exists()


def test_round_trip_and_missing(tmp_path):
    obj = {"w": torch.arange(3.0), "epoch": 2, "history": [{"a": 1.0}]}
    save_checkpoint(obj, tmp_path / "sub" / "c.pt")
    back = load_checkpoint(tmp_path / "sub" / "c.pt")
    assert back["epoch"] == 2 and torch.equal(back["w"], obj["w"])
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert p.read_text().strip().startswith("{") and '"ok": 1' in p.read_text()
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind
