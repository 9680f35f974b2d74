"""The run's configuration: the sections of every stage composed into one :class:`Config`, YAML loading, dotted
overrides and saving the resolved config.

YAML and the command line only *fill* the dataclasses; nothing here is global. Every section of a YAML file maps
1:1 onto a dataclass that lives with its stage and validates against that stage's own registry
(:class:`~bsnn.data.DataConfig`, :class:`~bsnn.models.config.ModelConfig`, :class:`~bsnn.train.TrainConfig`,
:class:`~bsnn.binary.BinaryConfig`, :class:`~bsnn.distill.config.DistillConfig`, :class:`~bsnn.tandem.TandemConfig`,
:class:`~bsnn.convert.config.ConvertConfig`, :class:`~bsnn.simulate.SimConfig`,
:class:`~bsnn.hardware.config.CostConfig`); they are re-exported here. Unknown keys are errors that list the valid
keys, and values are type-checked and range-checked by ``validate()``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from bsnn._validate import (_Loader, _check, _coerce, _finite, _from_dict, _number,  # noqa: F401 (re-exports)
                            apply_overrides, parse_override, read_yaml_mapping, yaml_load)
from bsnn._validate import from_dict as _from_dict_of
from bsnn.binary import BinaryConfig
from bsnn.convert.calibrate import MSE, Max, Percentile
from bsnn.convert.config import ConvertConfig, parse_statistic  # noqa: F401 (re-export)
from bsnn.data import DataConfig
from bsnn.distill.config import DistillConfig
from bsnn.errors import ConfigError
from bsnn.hardware.config import CostConfig
from bsnn.io import atomic_write_text
from bsnn.models.config import ModelConfig
from bsnn.simulate import SimConfig
from bsnn.tandem import TandemConfig
from bsnn.train import TrainConfig

__all__ = ["BinaryConfig", "Config", "ConvertConfig", "CostConfig", "DataConfig", "DistillConfig", "ModelConfig",
           "RunConfig", "SimConfig", "TandemConfig", "TrainConfig", "apply_overrides", "from_dict", "load_config",
           "parse_override", "parse_statistic", "read_yaml_mapping", "save_config", "yaml_load"]


@dataclass
class RunConfig:
    """Where and how a run executes.

    Attributes:
        out_dir: run folder (resolved config, checkpoints, metrics, log, tables and plots).
        seed: global seed (data split, init, shuffling).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present).
        quiet: turn progress bars off.
    """

    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False

    def validate(self) -> None:
        index = self.device[5:] if self.device.startswith("cuda:") else None
        _check(self.device in ("cpu", "cuda", "auto") or (index is not None and index.isdigit()),
               f"run.device must be 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'auto', got {self.device!r}")


@dataclass
class Config:
    """The whole pipeline's configuration; each attribute is one YAML section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    binary: BinaryConfig = field(default_factory=BinaryConfig)
    student: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tandem: TandemConfig = field(default_factory=TandemConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    simulate: SimConfig = field(default_factory=SimConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def validate(self) -> "Config":
        """Validate every section, prefixing errors with the section name; returns ``self``."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            try:
                section.validate()
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith(f.name + ".") else f"[{f.name}] {msg}") from None
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-serialisable; tuples become lists)."""
        return _plain({f.name: _section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _section_dict(section: Any) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _plain(obj: Any) -> Any:
    if isinstance(obj, Max):
        return "max"
    if isinstance(obj, Percentile):
        return obj.p
    if isinstance(obj, MSE):
        return obj.spec()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def from_dict(d: dict | None, cls: type | None = None) -> Any:
    """Build a config dataclass (default :class:`Config`) from a nested dict, validating it."""
    return _from_dict_of(d, Config if cls is None else cls)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None), apply overrides and validate.

    Args:
        path: YAML file whose top-level keys are the sections of :class:`Config`.
        overrides: dotted ``section.key=value`` strings applied after the file.

    Raises:
        ConfigError: missing file, malformed YAML, unknown key, wrong type or out-of-range value.
    """
    d = read_yaml_mapping(path, "config file", "pass an existing YAML file (see configs/)") if path is not None else {}
    d = apply_overrides(d, overrides or [])
    return from_dict(d)


def save_config(cfg: Config, path: str | os.PathLike, omit: dict | None = None) -> None:
    """Write the resolved config as YAML (atomically), without the ``omit`` fields (``{section: (field, ...)}``)."""
    d = cfg.to_dict()
    for section, fields in (omit or {}).items():
        d[section] = {k: v for k, v in d[section].items() if k not in fields}
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))
