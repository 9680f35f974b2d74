"""Exception types raised by bsnn.

Every user-facing failure is a :class:`BsnnError` (or a subclass) whose message names what is wrong
(layer, option, file) and what to do about it.
"""

from __future__ import annotations


class BsnnError(Exception):
    """Base class of every error bsnn raises on purpose."""


class ConfigError(BsnnError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(BsnnError, FileNotFoundError):
    """A dataset could not be found or read."""


class CheckpointError(BsnnError):
    """A checkpoint is missing, corrupt or incompatible."""


class ConversionError(BsnnError):
    """A model contains an op or module that cannot be converted to a spiking network."""


class TrainingError(BsnnError, FloatingPointError):
    """Training cannot go on, e.g. the loss became NaN or infinite (a ``FloatingPointError`` too)."""
