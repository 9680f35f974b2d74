"""Distillation: pure losses (:mod:`bsnn.distill.losses`) and the method registry.

``bsnn.distill.list_methods()`` names the registered methods; ``build_distiller(student, teacher, cfg)`` builds
one from a :class:`bsnn.config.DistillConfig` (``method``, ``temperature``, ``ce_weight``, ``kd_weight``,
``params``; None = the method's published value). See :mod:`bsnn.distill.methods`. The TAKD chain
(teacher -> assistants -> student) is :func:`bsnn.pipeline.takd_chain`.
"""

from bsnn.distill import losses
from bsnn.distill.hooks import FeatureTap
from bsnn.distill.indexed import IndexedDataset
from bsnn.distill.methods import METHODS, Distiller, DistillWarning, build_distiller, list_methods

__all__ = ["METHODS", "DistillWarning", "Distiller", "FeatureTap", "IndexedDataset", "build_distiller",
           "list_methods", "losses"]
