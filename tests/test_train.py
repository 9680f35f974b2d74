import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from bsnn.binary import binarize_, is_binary
from bsnn.config import DistillConfig, TrainConfig
from bsnn.train import build_optimizer, build_scheduler, evaluate, lr_at, param_groups, train_student, train_teacher


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 2:4, 2:4].mean(dim=(1, 2)) > 0).long()
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(ds, batch_size=16, sampler=sampler), DataLoader(ds, batch_size=64)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 4))


class Crash(Exception):
    """Raised by :func:`crash_after_2` to kill a training run after its second epoch's checkpoint."""


def crash_after_2(epoch, metrics):
    if epoch == 2:
        raise Crash()


def test_param_groups_no_decay_on_bn_and_bias():
    net = _net()
    decay, no_decay = param_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_schedule_matches_closed_form(schedule):
    cfg = TrainConfig(epochs=6, lr=0.1, schedule=schedule, step_epochs=2, gamma=0.5, optimizer="sgd")
    opt = build_optimizer(_net(), cfg)
    sched = build_scheduler(opt, cfg)
    for epoch in range(cfg.epochs):
        assert math.isclose(opt.param_groups[0]["lr"], lr_at(cfg, epoch), rel_tol=1e-9, abs_tol=1e-12)
        opt.step()
        sched.step()


def test_teacher_learns_and_is_deterministic():
    train, test = _data()
    cfg = TrainConfig(epochs=8, lr=0.02)
    a, b = _net(), _net()
    torch.manual_seed(1)
    h = train_teacher(a, train, cfg, quiet=True)
    torch.manual_seed(1)
    train_teacher(b, train, cfg, quiet=True)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert evaluate(a, test)["accuracy"] > 60


def test_resume_after_crash_gives_identical_weights(tmp_path):
    train, _ = _data()
    cfg = TrainConfig(epochs=3, lr=0.01)
    ref = binarize_(_net())
    torch.manual_seed(3)
    train_teacher(ref, train, cfg, quiet=True)

    ck = tmp_path / "last.pt"
    run1 = binarize_(_net())
    torch.manual_seed(3)
    with pytest.raises(Crash):
        train_teacher(run1, train, cfg, checkpoint_path=ck, quiet=True, on_epoch_end=crash_after_2)
    torch.manual_seed(12345)  # a fresh process would have a different RNG state: resume must restore it
    run2 = binarize_(_net(seed=99))
    hist = train_teacher(run2, train, cfg, checkpoint_path=ck, resume=True, quiet=True)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for (k, pa), pb in zip(ref.state_dict().items(), run2.state_dict().values()):
        assert torch.equal(pa, pb), k


def test_student_distillation_teacher_frozen_and_latent_clamped():
    train, test = _data()
    teacher = _net(1)
    train_teacher(teacher, train, TrainConfig(epochs=3, lr=0.01), quiet=True)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = binarize_(_net(2))
    hist = train_student(student, teacher, train, DistillConfig(method="kd", temperature=4.0),
                         TrainConfig(epochs=3, lr=0.05), val_loader=test, quiet=True)
    assert "val_acc" in hist[-1]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k  # teacher untouched (incl. BN running stats: eval mode)
    assert not teacher.training
    for m in student.modules():
        if is_binary(m):
            assert m.weight.abs().max() <= 1.0


def test_nonfinite_loss_is_reported():
    train, _ = _data()
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train_teacher(_net(), train, TrainConfig(epochs=2, lr=1e30, optimizer="sgd"), quiet=True)


@pytest.mark.parametrize("method, params", [("crd", {"feat_dim": 8, "nce_k": 16}), ("dkd", {"warmup": 2}),
                                            ("fitnet", {}), ("dml", {}), ("cc", {"feat_dim": 8}), ("nst", {}),
                                            ("ls_kd", {}), ("logit_mse", {}), ("vid", {})])
def test_train_student_wires_methods(method, params):
    """train_student supplies what methods need: the sample index (CRD), the epoch (DKD warm-up), projection heads
    built before the optimiser (FitNet), and peers trained jointly (DML)."""
    train, test = _data()
    teacher = _net(1).eval()
    student = binarize_(_net(2))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    hist = train_student(student, teacher, train, DistillConfig(method=method, params=params, ce_weight=1.0,
                                                                kd_weight=1.0), TrainConfig(epochs=2, lr=0.01),
                         quiet=True)
    assert len(hist) == 2 and math.isfinite(hist[-1]["train_loss"])
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def _lrs_per_batch(cfg: TrainConfig) -> tuple[list[float], torch.optim.Optimizer]:
    """The learning rate before each batch of ``cfg.epochs`` epochs of :func:`_data` (6 batches per epoch)."""
    train, _ = _data()
    opt = build_optimizer(_net(), cfg)
    sched = build_scheduler(opt, cfg, len(train))
    lrs = []
    for _ in range(cfg.epochs * len(train)):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, opt


def test_onecycle_warms_up_then_decays_linearly_every_batch():
    from bsnn.train import SCHEDULES, onecycle_factor

    cfg = TrainConfig(epochs=3, lr=0.2, schedule="onecycle", warmup_epochs=0.5, optimizer="sgd", nesterov=True)
    assert SCHEDULES.get("onecycle").per_step and not SCHEDULES.get("cosine").per_step
    lrs, opt = _lrs_per_batch(cfg)
    assert lrs[:3] == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])  # warm-up over round(0.5 * 6) = 3 steps
    assert lrs[3:] == pytest.approx([0.2 * (18 - i) / 15 for i in range(3, 18)])  # linear to 0 at step 18
    assert onecycle_factor(18, 18, 3) == 0.0 and opt.param_groups[0]["nesterov"]


def test_ema_weights_are_the_trained_model_and_resume_exactly(tmp_path):
    train, test = _data()
    cfg = TrainConfig(epochs=4, lr=0.02, ema_decay=0.9)
    torch.manual_seed(1)
    a = _net()
    train_teacher(a, train, cfg, quiet=True)
    torch.manual_seed(1)
    plain = _net()
    train_teacher(plain, train, TrainConfig(epochs=4, lr=0.02), quiet=True)
    assert not torch.equal(a[0].weight, plain[0].weight)  # the returned weights are the average, not the last

    ck = tmp_path / "last.pt"
    torch.manual_seed(1)
    with pytest.raises(Crash):
        train_teacher(_net(), train, cfg, checkpoint_path=ck, quiet=True, on_epoch_end=crash_after_2)
    torch.manual_seed(12345)
    c = _net(seed=99)
    train_teacher(c, train, cfg, checkpoint_path=ck, resume=True, quiet=True)  # the EMA state resumes too
    for pa, pc in zip(a.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pc)


def test_bf16_autocast_and_channels_last_train_and_leave_a_plain_fp32_model():
    train, test = _data()
    net = _net()
    h = train_teacher(net, train, TrainConfig(epochs=6, lr=0.02, autocast="bf16", channels_last=True), quiet=True)
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in net.parameters())


@pytest.mark.parametrize("key, value, match", [("schedule", "linear", "schedule must be one of"),
                                               ("ema_decay", 1.0, "ema_decay must be in"),
                                               ("autocast", "fp16", "autocast must be"),
                                               ("warmup_epochs", 9, "warmup_epochs must be in")])
def test_fast_training_settings_are_validated(key, value, match):
    from bsnn.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        TrainConfig(epochs=3, **{key: value}).validate()


def test_ema_forgets_the_initialisation():
    from bsnn.train import ema_average, ema_decay_at

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999
    avg, w = torch.zeros(()), torch.ones(())
    fn = ema_average(0.999)
    for n in range(2000):  # a constant weight of 1 after an initial 0: the average must have forgotten the 0
        avg = fn(avg, w, n)
    assert float(avg) > 0.999


def test_fidelity_is_agreement_and_kl_against_the_teacher():
    from bsnn.train import fidelity

    _, test = _data()
    teacher = _net(1).eval()
    same = fidelity(teacher, teacher, test)
    assert same["agreement"] == 100.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    other = _net(2).eval()
    f = fidelity(other, teacher, test)
    x = torch.cat([b[0] for b in test])
    with torch.no_grad():
        p_t, log_s = torch.softmax(teacher(x), 1), torch.log_softmax(other(x), 1)
        kl = (p_t * (p_t.log() - log_s)).sum(1).mean().item()
        agree = 100.0 * (teacher(x).argmax(1) == other(x).argmax(1)).float().mean().item()
    assert f["kl"] == pytest.approx(kl, rel=1e-5) and f["agreement"] == pytest.approx(agree)


def test_onecycle_start_and_end_factors_follow_airbench_shape():
    from bsnn.train import onecycle_factor

    cfg = TrainConfig(epochs=2, lr=1.0, schedule="onecycle", warmup_epochs=0.5, lr_start_factor=0.2,
                      lr_end_factor=0.07, optimizer="sgd")
    lrs, _ = _lrs_per_batch(cfg)
    assert len(lrs) == 12
    assert lrs[:3] == pytest.approx([0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0])
    assert lrs[3:] == pytest.approx([0.07 + 0.93 * (12 - i) / 9 for i in range(3, 12)])
    assert onecycle_factor(12, 12, 3, 0.2, 0.07) == pytest.approx(0.07)
    with pytest.raises(Exception, match="lr_end_factor must be in"):
        TrainConfig(lr_end_factor=1.5).validate()


def test_lookahead_follows_the_airbench_update_rule():
    from bsnn.train import Lookahead

    net = nn.Linear(1, 1, bias=False).requires_grad_(False)
    net.weight.fill_(1.0)
    la = Lookahead(net, decay=0.5, every=2)
    total, slow = 8, 1.0
    for step in range(1, total + 1):
        net.weight.add_(1.0)  # a "training step"
        fast = float(net.weight)
        la.step(step, total)
        if step % 2 == 0:
            a = 0.5 ** 2 * (step / total) ** 3
            slow = a * slow + (1 - a) * fast  # slow <- slow + (1 - a)(fast - slow); fast <- slow
            assert float(net.weight) == pytest.approx(slow) and float(la.slow["weight"]) == pytest.approx(slow)
        else:
            assert float(net.weight) == fast
    net.weight.add_(5.0)
    la.finish()
    assert float(net.weight) == pytest.approx(slow)


def test_lookahead_training_resumes_exactly_and_excludes_ema(tmp_path):
    train, _ = _data()
    cfg = TrainConfig(epochs=4, lr=0.02, optimizer="sgd", momentum=0.9, lookahead_every=5)
    torch.manual_seed(1)
    a = _net()
    train_teacher(a, train, cfg, quiet=True)
    torch.manual_seed(1)
    plain = _net()
    train_teacher(plain, train, TrainConfig(epochs=4, lr=0.02, optimizer="sgd", momentum=0.9), quiet=True)
    assert not torch.equal(a[0].weight, plain[0].weight)
    ck = tmp_path / "last.pt"
    torch.manual_seed(1)
    with pytest.raises(Crash):
        train_teacher(_net(), train, cfg, checkpoint_path=ck, quiet=True, on_epoch_end=crash_after_2)
    c = _net(seed=99)
    train_teacher(c, train, cfg, checkpoint_path=ck, resume=True, quiet=True)
    for pa, pc in zip(a.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pc)
    with pytest.raises(Exception, match="choose one weight average"):
        TrainConfig(ema_decay=0.9, lookahead_every=5).validate()


def test_decay_biases_gives_the_bias_group_the_weights_decay_per_step():
    decay, no_decay = param_groups(_net(), 1e-3, lr=0.5, bias_lr_scale=64.0, decay_biases=True)
    assert no_decay["lr"] == 32.0 and no_decay["weight_decay"] == pytest.approx(1e-3 / 64)
    assert decay["weight_decay"] == 1e-3  # lr * wd is the same per step in both groups
