"""Distillation: pure losses (:mod:`bsnn.distill.losses`) and the method registry."""

from bsnn.distill import losses
from bsnn.distill.methods import METHODS, Distiller, build_distiller, list_methods

__all__ = ["METHODS", "Distiller", "build_distiller", "list_methods", "losses"]
