"""Train a CIFAR-10 binary-weight VGG the way a user outside bsnn would: plain PyTorch, plain ReLU, CE only.

The network is the one the default-recipe study (``benchmarks/default_recipe.py``) converts as "a network bsnn did
not train": 6 conv (3x3, BN, ReLU) + 2 FC, average pooling, hidden layers binarised with :func:`bsnn.binarize_`
(α·sign(W), first and last layer full precision), trained by an ordinary loop here — no distillation, no QCFS, no
clipping, no bsnn training code. Data: ``../shared/data/cifar10.npz`` (CIFAR-10, JPEG copy); 45,000 images train,
the last 5,000 of the training set are the validation split (the best epoch is picked on it), the test set is
untouched here.

``--pool max --full-precision`` trains the max-pool, full-precision VGG that ``benchmarks/maxpool.py`` converts.

Run:  python benchmarks/train_plain_vgg.py --epochs 20 --out benchmarks/models/cifar10_plain_bvgg.pt
      python benchmarks/train_plain_vgg.py --pool max --full-precision --epochs 8 --threads 1 \
          --out benchmarks/models/cifar10_maxpool_vgg.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import bsnn
from bsnn.binary import clamp_latent_
from bsnn.io import load_checkpoint, save_checkpoint

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def plain_vgg(width: int = 32, num_classes: int = 10, pool: str = "avg") -> nn.Sequential:
    """6 conv + 2 FC VGG with average (``pool="avg"``) or max pooling (``"max"``): bsnn's registered
    ``plain_vgg8`` (plain torch layers, so it is rebuilt from a model record), ``[B, 3, 32, 32]`` -> logits."""
    return bsnn.create_model("plain_vgg8", num_classes=num_classes, width=width, pool=pool)


def load_cifar(path: Path = DATA) -> dict[str, torch.Tensor]:
    """uint8 NCHW tensors: train (45k), val (last 5k of train), test (10k)."""
    d = np.load(path, allow_pickle=False)
    xtr = torch.from_numpy(d["x_train"]).permute(0, 3, 1, 2).contiguous()
    ytr = torch.from_numpy(d["y_train"]).long().flatten()
    xte = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).contiguous()
    yte = torch.from_numpy(d["y_test"]).long().flatten()
    return {"x_train": xtr[:45000], "y_train": ytr[:45000], "x_val": xtr[45000:], "y_val": ytr[45000:],
            "x_test": xte, "y_test": yte}


def normalise(x_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_u8.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip of a normalised batch ``[B, 3, 32, 32]``."""
    b = x.shape[0]
    xp = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (b,), generator=g)
    j = torch.randint(0, 9, (b,), generator=g)
    rows = (i.view(b, 1) + torch.arange(32)).view(b, 1, 32, 1).expand(b, 3, 32, 40)
    xp = xp.gather(2, rows)
    cols = (j.view(b, 1) + torch.arange(32)).view(b, 1, 1, 32).expand(b, 3, 32, 32)
    out = xp.gather(3, cols)
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(normalise(x_u8[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(y), batch))
    return 100.0 * correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", choices=("avg", "max"), default="avg", help="pooling of the VGG")
    ap.add_argument("--full-precision", action="store_true", help="keep every layer full precision (no binarize_)")
    ap.add_argument("--out", default="benchmarks/models/cifar10_plain_bvgg.pt")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = load_cifar()
    model = plain_vgg(args.width, pool=args.pool)
    if not args.full_precision:
        model = bsnn.binarize_(model)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps = args.epochs * math.ceil(45000 / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(args.seed)
    best, history, t0 = -1.0, [], time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(45000, generator=g)
        bar = tqdm(range(0, 45000, args.batch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10)
        for i in bar:
            idx = perm[i:i + args.batch]
            x = augment(normalise(data["x_train"][idx]), g)
            loss = F.cross_entropy(model(x), data["y_train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_latent_(model)
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = accuracy(model, data["x_val"], data["y_val"])
        history.append({"epoch": epoch + 1, "val_acc": val, "wall_s": round(time.time() - t0, 1)})
        print(json.dumps(history[-1]), flush=True)
        if val > best:
            best = val
            save_checkpoint({"model": model.state_dict(), "width": args.width, "pool": args.pool,
                             "binary": not args.full_precision, "epoch": epoch + 1, "val_acc": val}, out)
    state = load_checkpoint(out)
    model.load_state_dict(state["model"])
    test = accuracy(model, data["x_test"], data["y_test"])
    state.update(test_acc=test, history=history)
    save_checkpoint(state, out)
    print(json.dumps({"best_val_acc": best, "epoch": state["epoch"], "test_acc": test}), flush=True)


if __name__ == "__main__":
    main()
