"""Distillation: pure losses (:mod:`bsnn.distill.losses`) and the method registry.

``bsnn.distill.list_methods()`` names the registered methods; ``build_distiller(student, teacher, cfg)`` builds
one from a :class:`bsnn.config.DistillConfig` (``method``, ``temperature``, ``ce_weight``, ``kd_weight``,
``params``). See :mod:`bsnn.distill.methods`.
"""

from bsnn.distill import losses
from bsnn.distill.hooks import FeatureTap
from bsnn.distill.indexed import IndexedDataset
from bsnn.distill.methods import METHODS, Distiller, build_distiller, list_methods, takd_chain

__all__ = ["METHODS", "Distiller", "FeatureTap", "IndexedDataset", "build_distiller", "list_methods", "losses",
           "takd_chain"]
