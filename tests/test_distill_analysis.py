"""Knowledge-level methods (universe_ls, domain_kd), the knowledge-level analysis and early-stopped teacher selection.

The references below restate the definitions of Tang et al. 2020 ("Understanding and Improving Knowledge
Distillation": universe = label smoothing at the teacher's mean confidence, domain = each class's mean teacher
distribution, instance = KD) sample by sample in plain Python / float64, independently of bsnn's vectorised code.
Neither Tang et al. nor Cho & Hariharan (ICCV 2019) published code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from bsnn.config import DistillConfig, TrainConfig, load_config
from bsnn.distill import METHODS, build_distiller
from bsnn.distill.analysis import (LEVELS, choose_candidate, gain_fractions, knowledge_levels, levels_table,
                                   select_teacher, selection_table, teacher_statistics)
from bsnn.distill.levels import soft_label_kd_loss
from bsnn.errors import ConfigError
from bsnn.train import fit

K = 4
D = torch.float64
RTOL, ATOL = 1e-6, 1e-12


def _net(seed: int, width: int = 4, k: int = K) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, k)).double()


def _data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=D)
    y = torch.arange(n) % K  # every class present
    return x, y[torch.randperm(n, generator=g)]


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


# ------------------------------------------------------------------------------- references (plain Python loops)


def ref_softmax_row(z: list[float], t: float) -> list[float]:
    m = max(v / t for v in z)
    e = [math.exp(v / t - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def ref_teacher_stats(teacher, x, t):
    """Mean max-probability and per-class mean distribution of ``softmax(z_t / T)``, one sample at a time."""
    with torch.no_grad():
        z = teacher(x)
    probs = [ref_softmax_row(row.tolist(), t) for row in z]
    return probs


def ref_level_loss(z_s: torch.Tensor, y, q_rows, t, ce_w, kd_w):
    """``ce_w · CE + kd_w · T² · mean_b Σ_k q_bk (log q_bk − log softmax(z_s,b / T)_k)``, written per sample."""
    b = z_s.shape[0]
    total_ce, total_kl = 0.0, 0.0
    for i in range(b):
        zi = z_s[i]
        ce = torch.logsumexp(zi, 0) - zi[int(y[i])]
        log_p = zi / t - torch.logsumexp(zi / t, 0)
        kl = sum((q * (math.log(q) - log_p[k]) if q > 0 else 0.0 * log_p[k]) for k, q in enumerate(q_rows[i]))
        total_ce = total_ce + ce
        total_kl = total_kl + kl
    return ce_w * total_ce / b + kd_w * t * t * total_kl / b


def ref_universe_rows(y, c):
    return [[c if k == int(yi) else (1 - c) / (K - 1) for k in range(K)] for yi in y]


def ref_domain_table(probs, y):
    table = []
    for k in range(K):
        rows = [p for p, yi in zip(probs, y) if int(yi) == k]
        table.append([sum(r[j] for r in rows) / len(rows) for j in range(K)] if rows else None)
    return table


# ---------------------------------------------------------------------------------------- the two methods


def test_registered_with_kds_published_weights():
    for name in ("universe_ls", "domain_kd"):
        cls = METHODS.get(name)
        assert (cls.default_ce_weight, cls.default_kd_weight, cls.default_temperature) == (0.1, 0.9, 4.0)
    assert METHODS.get("universe_ls").param_defaults == {"confidence": None}
    assert METHODS.get("domain_kd").param_defaults == {"class_targets": None}


@pytest.mark.parametrize("method", ["universe_ls", "domain_kd"])
def test_value_and_gradient_equal_the_reference_with_given_statistics(method):
    teacher, student = _net(10, width=6), _net(0)
    x, y = _data()
    t = 4.0
    probs = ref_teacher_stats(teacher, x, t)
    conf = sum(max(p) for p in probs) / len(probs)
    table = ref_domain_table(probs, y)
    params = {"confidence": conf} if method == "universe_ls" else {"class_targets": table}
    d = build_distiller(student, teacher, DistillConfig(method=method, params=params))
    d.train()
    out = d(x, y)
    rows = ref_universe_rows(y, conf) if method == "universe_ls" else [table[int(yi)] for yi in y]
    ref = ref_level_loss(student(x), y, rows, t, 0.1, 0.9)
    wrt = list(student.parameters())
    torch.testing.assert_close(out["loss"], ref, rtol=RTOL, atol=0)
    torch.testing.assert_close(_grads(out["loss"], wrt), _grads(ref, wrt), rtol=RTOL, atol=ATOL)
    ce = nn.functional.cross_entropy(student(x), y).detach()
    assert out[method].item() == pytest.approx(float((ref.detach() - 0.1 * ce) / 0.9), rel=1e-9)


@pytest.mark.parametrize("method", ["universe_ls", "domain_kd"])
def test_first_epoch_estimate_is_frozen_to_the_exact_training_set_statistics(method):
    """Estimated in the first epoch (running means, this batch included), then frozen: equal to the statistics
    computed sample by sample, and the loss with the frozen statistic equals the reference."""
    teacher, student = _net(10, width=6), _net(0)
    x, y = _data(16)
    t = 2.0
    d = build_distiller(student, teacher, DistillConfig(method=method, temperature=t))
    d.train()
    d.set_epoch(0)
    first = d(x[:8], y[:8])
    probs = ref_teacher_stats(teacher, x, t)
    part = probs[:8]
    if method == "universe_ls":  # the first batch used its own statistic
        c8 = sum(max(p) for p in part) / 8
        ref = ref_level_loss(student(x[:8]), y[:8], ref_universe_rows(y[:8], c8), t, 0.1, 0.9)
    else:
        tab8 = ref_domain_table(part, y[:8])  # rows of the classes in the batch
        ref = ref_level_loss(student(x[:8]), y[:8], [tab8[int(v)] for v in y[:8]], t, 0.1, 0.9)
    torch.testing.assert_close(first["loss"], ref, rtol=RTOL, atol=0)
    d(x[8:], y[8:])
    d.set_epoch(1)  # frozen from now on
    conf = sum(max(p) for p in probs) / len(probs)
    table = ref_domain_table(probs, y)
    if method == "universe_ls":
        assert d.confidence() == pytest.approx(conf, rel=1e-12)
    else:
        torch.testing.assert_close(d.class_targets(), torch.tensor(table, dtype=D), rtol=1e-12, atol=0)
    xb, yb = x[3:9], y[3:9]
    out = d(xb, yb)
    rows = ref_universe_rows(yb, conf) if method == "universe_ls" else [table[int(v)] for v in yb]
    ref = ref_level_loss(student(xb), yb, rows, t, 0.1, 0.9)
    torch.testing.assert_close(out["loss"], ref, rtol=RTOL, atol=0)
    wrt = list(student.parameters())
    torch.testing.assert_close(_grads(out["loss"], wrt), _grads(ref, wrt), rtol=RTOL, atol=ATOL)
    state = d.state_dict()  # the frozen statistic is checkpointed and restored
    d2 = build_distiller(_net(0), teacher, DistillConfig(method=method, temperature=t))
    d2.load_state_dict(state)
    torch.testing.assert_close(d2(xb, yb)["loss"], out["loss"], rtol=1e-12, atol=0)


def test_domain_kd_unseen_class_falls_back_to_its_one_hot_label():
    teacher, student = _net(10, width=6), _net(0)
    x, y = _data()
    keep = y != 3
    d = build_distiller(student, teacher, DistillConfig(method="domain_kd"))
    d.train()
    d(x[keep], y[keep])
    d.set_epoch(1)
    d.eval()
    q = d.soft_labels(d.stat_sum, d.stat_count, torch.tensor([3]), K)
    torch.testing.assert_close(q, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=D))


def test_bad_statistics_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match=r"confidence must be in \(0, 1\]"):
        build_distiller(_net(0), _net(1), DistillConfig(method="universe_ls", params={"confidence": 1.5}))
    with pytest.raises(ConfigError, match="K x K list of probability rows"):
        build_distiller(_net(0), _net(1), DistillConfig(method="domain_kd", params={"class_targets": [[1, 0]]}))
    d = build_distiller(_net(0), _net(1), DistillConfig(method="domain_kd",
                                                        params={"class_targets": [[0.5, 0.5], [0.5, 0.5]]}))
    with pytest.raises(ConfigError, match="student has 4 classes"):
        d(*_data())


def test_soft_label_kd_equals_kd_when_the_target_is_the_teacher():
    from bsnn.distill import losses as L

    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(5, K, generator=g, dtype=D), torch.randn(5, K, generator=g, dtype=D)
    q = torch.softmax(z_t / 3.0, 1)
    torch.testing.assert_close(soft_label_kd_loss(z_s, q, 3.0), L.kd_loss(z_s, z_t, 3.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["universe_ls", "domain_kd"])
def test_training_smoke_reduces_the_loss(method):
    teacher, student = _net(10, width=6).float(), _net(0).float()
    x, y = _data(32)
    loader = DataLoader(TensorDataset(x.float(), y), batch_size=8)
    d = build_distiller(student, teacher, DistillConfig(method=method))
    hist = fit(d, student, loader, TrainConfig(epochs=4, lr=0.02), quiet=True)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert bool(d.stat_frozen)


def test_estimated_statistics_survive_a_killed_and_resumed_run(tmp_path):
    """Killed after the first epoch and resumed from its checkpoint: the same weights and frozen statistic as an
    uninterrupted run (the running sums are checkpointed with the distiller)."""
    x, y = _data(32)
    loader = DataLoader(TensorDataset(x.float(), y), batch_size=8)
    cfg = TrainConfig(epochs=3, lr=0.02)

    def run(ck=None, resume=False, stop=None):
        student, teacher = _net(0).float(), _net(10, width=6).float()
        d = build_distiller(student, teacher, DistillConfig(method="domain_kd"))

        def kill(epoch, _m):
            if epoch == stop:
                raise KeyboardInterrupt

        try:
            fit(d, student, loader, cfg, checkpoint_path=ck, resume=resume, quiet=True, on_epoch_end=kill)
        except KeyboardInterrupt:
            pass
        return student, d

    ref_student, ref_d = run()
    run(tmp_path / "ck.pt", stop=1)
    student, d = run(tmp_path / "ck.pt", resume=True)
    for a, b in zip(student.state_dict().values(), ref_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert d.stat_frozen and torch.equal(d.class_targets(), ref_d.class_targets())


# ------------------------------------------------------------------------------------------ statistics, shares


def test_teacher_statistics_equal_the_per_sample_reference():
    teacher = _net(10, width=6)
    x, y = _data(20)
    stats = teacher_statistics(teacher, DataLoader(TensorDataset(x, y), batch_size=6), temperature=2.0)
    probs = ref_teacher_stats(teacher, x, 2.0)
    assert stats["confidence"] == pytest.approx(sum(max(p) for p in probs) / 20, rel=1e-12)
    torch.testing.assert_close(torch.tensor(stats["class_targets"], dtype=D),
                               torch.tensor(ref_domain_table(probs, y), dtype=D), rtol=1e-12, atol=0)
    assert stats["samples"] == 20 and sum(stats["class_counts"]) == 20


def test_gain_fractions_add_up_as_defined():
    acc = {"ce": 80.0, "universe": 82.0, "domain": 83.5, "instance": 85.0}
    f = gain_fractions(acc)
    assert f["universe"] == pytest.approx(2.0 / 5.0) and f["domain"] == pytest.approx(1.5 / 5.0)
    assert f["instance"] == pytest.approx(1.5 / 5.0)
    assert f["universe"] + f["domain"] + f["instance"] == pytest.approx(1.0)
    assert f["domain_cumulative"] == pytest.approx(3.5 / 5.0) and f["instance_cumulative"] == pytest.approx(1.0)
    assert set(gain_fractions({**acc, "instance": 80.0}).values()) == {None}  # KD gains nothing: undefined


def test_choose_candidate_is_the_argmax_first_on_ties():
    assert choose_candidate([70.0, 75.5, 75.5, 60.0]) == 1
    with pytest.raises(ConfigError, match="no candidate"):
        choose_candidate([])


# ---------------------------------------------------------------------------- analysis and selection, end to end


def _digits():
    """sklearn digits as float32 ``[N, 1, 8, 8]`` in [0, 1]: 300 train / 150 val / 150 test loaders."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    parts = [(x[a:b], y[a:b]) for a, b in ((0, 300), (300, 450), (450, 600))]
    return [DataLoader(TensorDataset(*p), batch_size=50) for p in parts], parts


def _mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class _Lookup(nn.Module):
    """A teacher that answers from a table: the nearest stored input's logits."""

    def __init__(self, keys: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keys", keys.flatten(1))
        self.register_buffer("out", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[torch.cdist(x.flatten(1), self.keys).argmin(1)]


def test_selection_chooses_the_teacher_that_distils_best_on_validation_not_the_most_accurate():
    """Candidate 'liar' is right on every validation and test image (100 %) but teaches a wrong class on every
    training image; 'honest' is a briefly trained, less accurate MLP. Selection must pick 'honest'."""
    (train, val, test), parts = _digits()
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    keys = torch.cat([xtr, xva, xte])
    labels = torch.cat([(ytr + 1) % 10, yva, yte])
    liar = _Lookup(keys, 10.0 * nn.functional.one_hot(labels, 10).float())
    honest = _mlp(5)
    from bsnn.train import evaluate, train_teacher

    train_teacher(honest, train, TrainConfig(epochs=2, lr=0.01), quiet=True)
    assert evaluate(honest, val)["accuracy"] < evaluate(liar, val)["accuracy"] == 100.0  # the construction
    sel = select_teacher([("liar", liar), ("honest", honest)], lambda: _mlp(1), train, val, DistillConfig(),
                         TrainConfig(epochs=10, lr=0.01), select_epochs=3, seed=7, quiet=True)
    accs = [r["student_val_acc"] for r in sel["candidates"]]
    assert sel["chosen_name"] == "honest" and sel["chosen"] == accs.index(max(accs)) == 1
    assert sel["candidates"][0]["teacher_val_acc"] == 100.0 and sel["selected_on"] == "validation split"
    headers, rows = selection_table(sel)
    assert rows[1][-1] == "**chosen**" and "3-epoch" in headers[2]
    with pytest.raises(ConfigError, match="validation split"):
        select_teacher([("a", honest)], lambda: _mlp(1), train, None, DistillConfig(), TrainConfig(), 1)
    with pytest.raises(ConfigError, match="one given teacher"):
        select_teacher([("a", honest)], lambda: _mlp(1), train, val, DistillConfig(method="ca_mkd"), TrainConfig(), 1)


def test_knowledge_levels_four_rows_reproducible_and_shares_as_defined():
    (train, val, test), _ = _digits()
    teacher = _mlp(5, hidden=64)
    from bsnn.train import evaluate, fidelity, set_seed, train_student, train_teacher

    train_teacher(teacher, train, TrainConfig(epochs=4, lr=0.01), quiet=True)
    cfg = TrainConfig(epochs=2, lr=0.01)
    report = knowledge_levels(teacher, lambda: _mlp(1, hidden=8), train, val, test, cfg, seed=3, quiet=True)
    rows = report["levels"]
    assert [r["level"] for r in rows] == list(LEVELS)
    assert [r["method"] for r in rows] == ["ce", "universe_ls", "domain_kd", "kd"]
    # the instance row is plain KD from the same initialisation: retrain it independently
    set_seed(3)
    kd_student = _mlp(1, hidden=8)
    train_student(kd_student, teacher, train, DistillConfig(method="kd"), cfg, quiet=True)
    assert rows[3]["test_acc"] == evaluate(kd_student, test)["accuracy"]
    assert rows[3]["val_acc"] == evaluate(kd_student, val)["accuracy"]
    f = fidelity(kd_student, teacher, test)
    assert rows[3]["agreement"] == f["agreement"] and rows[3]["kl"] == pytest.approx(f["kl"], rel=1e-9)
    stats = teacher_statistics(teacher, train, 4.0)
    assert report["statistics"]["confidence"] == pytest.approx(stats["confidence"], rel=1e-12)
    for split in ("test", "val"):
        acc = {r["level"]: r[f"{split}_acc"] for r in rows}
        assert report["gain_fractions"][split] == gain_fractions(acc)
    shares = [r["share"] for r in rows[1:]]
    gain = rows[3]["test_acc"] - rows[0]["test_acc"]
    assert gain != 0 and sum(shares) == pytest.approx(1.0)  # this setting's KD moves the test accuracy
    assert rows[1]["share"] == pytest.approx((rows[1]["test_acc"] - rows[0]["test_acc"]) / gain)
    assert rows[2]["share"] == pytest.approx((rows[2]["test_acc"] - rows[1]["test_acc"]) / gain)
    assert rows[2]["cumulative_share"] == pytest.approx((rows[2]["test_acc"] - rows[0]["test_acc"]) / gain)
    headers, table = levels_table(report)
    assert len(table) == 4 and len(headers) == len(table[0])


def _run_args(tmp_path, *extra):
    return ["--out", str(tmp_path / "run"), "data.name=digits", "data.limit_train=128", "data.limit_test=64",
            "train.epochs=2", "student.epochs=1", "--quiet", *extra]


def test_pipeline_keeps_teacher_checkpoints_and_records_the_choice(tmp_path, capsys):
    from bsnn.cli import main
    from bsnn.pipeline import load_model
    from bsnn.runfolder import read_metrics
    from bsnn.train import fidelity

    assert main(["train", *_run_args(tmp_path, "train.keep_epochs=[1]")]) == 0
    run = tmp_path / "run"
    m = read_metrics(run)
    assert "checkpoints/teacher_epoch1.pt" in m["teacher"]["record"]["outputs"]
    assert load_model(run / "checkpoints/teacher_epoch1.pt")[1]["epoch"] == 1
    assert main(["distill", *_run_args(tmp_path, "train.keep_epochs=[1]", "student.select_epochs=1")]) == 0
    out = capsys.readouterr().out
    assert "teacher selection (chosen on the validation split)" in out and "**chosen**" in out
    sel = read_metrics(run)["student"]["teacher_selection"]
    assert [c["name"] for c in sel["candidates"]] == ["checkpoints/teacher_epoch1.pt", "teacher.pt"]
    accs = [c["student_val_acc"] for c in sel["candidates"]]
    assert sel["chosen"] == choose_candidate(accs)
    assert json.loads((run / "teacher_selection.json").read_text())["chosen"] == sel["chosen"]
    # the student was distilled from (and is compared with) the chosen candidate
    from bsnn.config import load_config
    from bsnn.data import build_loaders

    chosen = load_model(run / ("checkpoints/teacher_epoch1.pt" if sel["chosen"] == 0 else "teacher.pt"))[0]
    student = load_model(run / "student.pt")[0]
    cfg = load_config(run / "config.yaml")
    f = fidelity(student, chosen, build_loaders(cfg.data, seed=cfg.run.seed).test)
    assert read_metrics(run)["student"]["teacher_agreement"] == f["agreement"]
    derived = read_metrics(run)["student"]["record"]["derived_from"]
    assert len(derived["candidates"]) == 2

    # the same, given as files; and the knowledge-level analysis of the run's teacher
    files = f"{run}/checkpoints/teacher_epoch1.pt,{run}/teacher.pt"
    assert main(["distill", *_run_args(tmp_path, "--select-teacher", files, "--overwrite")]) == 0
    sel2 = read_metrics(run)["student"]["teacher_selection"]
    assert sel2["select_epochs"] == 1 and [c["student_val_acc"] for c in sel2["candidates"]] == accs
    assert main(["distill", *_run_args(tmp_path, "--analyze")]) == 0
    out = capsys.readouterr().out
    assert "knowledge levels (Tang et al. 2020)" in out
    report = json.loads((run / "knowledge_levels.json").read_text())
    assert [r["level"] for r in report["levels"]] == list(LEVELS) and (run / "knowledge_levels.md").is_file()


def test_selection_errors_say_what_to_do_and_the_level_methods_run_from_the_command_line(tmp_path, capsys):
    from bsnn.cli import main
    from bsnn.pipeline import load_model

    assert main(["train", *_run_args(tmp_path)]) == 0
    assert main(["distill", *_run_args(tmp_path, "student.select_epochs=1")]) == 2
    assert "train.keep_epochs" in capsys.readouterr().err
    assert main(["distill", *_run_args(tmp_path, "--select-teacher", ",")]) == 2
    assert "needs the candidate teachers" in capsys.readouterr().err
    for i, method in enumerate(("universe_ls", "domain_kd")):  # both run from the command line
        assert main(["distill", *_run_args(tmp_path, f"distill.method={method}", *(["--overwrite"] if i else []))]) == 0
        record = load_model(tmp_path / "run" / "student.pt")[1]
        assert record["distill"]["method"] == method
