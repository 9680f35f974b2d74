import errno
import os
import pickle

import pytest
import torch

from bsnn.errors import CheckpointError
from bsnn.io import (CheckpointWarning, OutputError, atomic_write_json, atomic_write_text, digest, load_checkpoint,
                     save_checkpoint)


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


def test_content_hash_is_checked_on_load(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint({"w": torch.full((64,), 1.0), "b": torch.ones(3, dtype=torch.bfloat16), "m": torch.ones(2) > 0}, p)
    data = bytearray(p.read_bytes())
    at = data.find(torch.full((64,), 1.0).numpy().tobytes())
    data[at:at + 4] = torch.tensor([-4.0]).numpy().tobytes()  # same size: the zip container does not notice
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_checkpoint(p)
    assert "weights_only" not in str(e.value)


def test_torch_hint_to_load_unsafely_is_never_quoted(tmp_path, monkeypatch):
    monkeypatch.setenv("BSNN_PWNED", str(tmp_path / "pwned"))
    p = tmp_path / "evil.pt"
    torch.save({"payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match="GLOBAL posix.system") as e:
        load_checkpoint(p)
    assert "weights_only" not in str(e.value) and "will likely succeed" not in str(e.value)
    p.write_bytes(p.read_bytes()[:300])  # truncated: not a readable archive
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_checkpoint(p)


def test_files_without_a_hash_load_with_a_warning(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt")
    with pytest.warns(CheckpointWarning, match="no stored content hash"):
        assert torch.equal(load_checkpoint(tmp_path / "old.pt")["w"], torch.ones(2))


def test_digest_follows_content_not_order():
    a = {"x": torch.arange(4.0), "y": [1, "s", None]}
    assert digest(a) == digest({"y": [1, "s", None], "x": torch.arange(4.0)})
    assert digest(a) != digest({"x": torch.arange(4.0).double(), "y": [1, "s", None]})
    assert digest(a) != digest({"x": torch.arange(4.0).reshape(2, 2), "y": [1, "s", None]})
    assert digest(a) != digest({"x": torch.arange(4.0), "y": [1, "s", 0]})


def test_a_failed_write_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"ok": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device; free some disk space") as e:
        atomic_write_json(p, {"ok": 2})
    assert isinstance(e.value, OSError) and str(p) in str(e.value)
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"] and '"ok": 1' in p.read_text()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_keep_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    for f in ("a.txt", "c.pt"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
