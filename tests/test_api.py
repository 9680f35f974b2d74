"""The curated public API of DESIGN.md works end to end on a tiny problem."""

import torch
from torch.utils.data import DataLoader, TensorDataset

import bsnn


def test_public_api_pipeline():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    teacher = bsnn.create_model("small_cnn", num_classes=2, in_channels=1, width=4, hidden=16)
    bsnn.train_teacher(teacher, loader, bsnn.TrainConfig(epochs=1), quiet=True)
    student = bsnn.binarize_(bsnn.create_model("small_cnn", num_classes=2, in_channels=1, width=4, hidden=16),
                             bsnn.BinaryConfig())
    bsnn.train_student(student, teacher, loader, bsnn.DistillConfig(method="kd"), bsnn.TrainConfig(epochs=1),
                       quiet=True)
    snn = bsnn.convert(student, loader)  # the default recipe
    plain = bsnn.convert(student, loader, bsnn.ConvertConfig.plain())  # spikingjelly's IFNode starts at v = 0
    res = bsnn.simulate(snn, loader, timesteps=[1, 4, 16], quiet=True)
    assert isinstance(res, bsnn.SimResult) and set(res.accuracy) == {1, 4, 16}
    cost = bsnn.hardware.estimate(snn, res, "spikesim-rram-65nm")
    assert cost.total.energy_pj > 0
    assert "kd" in bsnn.distill.list_methods()
    assert bsnn.export.to_spikingjelly(plain) is not None
