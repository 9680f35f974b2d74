"""Registered distillation methods (one namespace for all of them).

A method is an ``nn.Module`` built as ``cls(student, teacher, cfg)`` whose ``forward(x, y, index=None)``
returns ``{'loss': scalar, 'logits': student logits [B, K], <named parts>...}``. The teacher is always in
eval mode and run under ``torch.no_grad()``; only the student (and any method-owned parameters) get
gradients. Feature-based methods read features through forward hooks, never by changing model signatures.

The base class and registry live in :mod:`bsnn.distill.base`; the methods in :mod:`bsnn.distill.logit`
(ce, kd, dkd, dist, nkd, tf_nkd, zipf_ls, bake, mixup_kd), :mod:`bsnn.distill.feature` (fitnet, at, sp, rkd,
pkt, crd) and :mod:`bsnn.distill.multi` (takd, ca_mkd, dml, bd_kd; the TAKD chain is :func:`bsnn.pipeline.takd_chain`).
"""

from __future__ import annotations

from bsnn.distill.base import METHODS, Distiller, DistillWarning, build_distiller, list_methods, register
from bsnn.distill.feature import AT, CRD, PKT, RKD, SP, FeatureDistiller, FitNet
from bsnn.distill.feature_classic import AB, FSP, FT, IRG, ReviewKD
from bsnn.distill.logit import BAKE, DIST, DKD, KD, NKD, CrossEntropyOnly, MixupKD, TfNKD, ZipfLS
from bsnn.distill.adaptive import IEKD, SAKD, Lipschitz
from bsnn.distill.multi import BDKD, CAMKD, DML, TAKD
from bsnn.distill.online import BYOT, SOKD, BornAgain, SwitOKD
from bsnn.distill.teacher_side import MetaDistil, PrUE, PruneDistill
from bsnn.distill.levels import DomainKD, UniverseLS

__all__ = [
    "AT", "BAKE", "BDKD", "CAMKD", "CRD", "DIST", "DKD", "DML", "KD", "METHODS", "NKD", "PKT", "RKD", "SP", "TAKD",
    "BYOT", "BornAgain", "SOKD", "SwitOKD",
    "CrossEntropyOnly", "DistillWarning", "Distiller", "FeatureDistiller", "FitNet", "MixupKD", "TfNKD", "ZipfLS",
    "IEKD", "Lipschitz", "SAKD",
    "MetaDistil", "PrUE", "PruneDistill",
    "DomainKD", "UniverseLS",
    "AB", "FSP", "FT", "IRG", "ReviewKD",
    "build_distiller", "list_methods", "register",
]
