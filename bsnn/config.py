"""Typed configuration: one dataclass per pipeline stage, YAML loading and dotted overrides.

YAML and the command line only *fill* these dataclasses; nothing here is global. Every section of a
YAML file maps 1:1 onto a dataclass below, unknown keys are errors that list the valid keys, and values
are type-checked and range-checked by ``validate()``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from bsnn.errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e30`` / ``1e-3`` are numbers, not strings (YAML 1.1 wanted
    ``1.0e+30``); ``.inf`` / ``.nan`` stay floats (and are refused where a finite number is needed)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (no code, plain data only) with YAML 1.2 floats (``1e30`` is a number)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return _number(value) and math.isfinite(value)


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
class DataConfig:
    """Dataset and loader settings (see :mod:`bsnn.data` for the registered names).

    Attributes:
        name: registered dataset name (``mnist5k``, ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
            ``cifar100``, ``imagefolder``) or ``npz:<path>`` for a Keras-style archive.
        root: directory holding the data files (torchvision datasets, ImageFolder).
        download: allow torchvision to download missing data (off by default: no hidden network use).
        batch_size: training batch size (per process under torchrun).
        eval_batch_size: batch size for validation/test/calibration.
        num_workers: DataLoader worker processes.
        augment: training augmentation (CIFAR: random crop + horizontal flip).
        val_fraction: fraction of the training data held out as validation (seeded, stratified).
        seed: seed of the train/val(/test) split; independent of the run seed so splits stay fixed.
        limit_train: optional cap on the number of training samples (quick experiments, tests).
        limit_test: optional cap on the number of test samples.
    """

    name: str = "mnist5k"
    root: Union[str, None] = None
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    limit_train: Union[int, None] = None
    limit_test: Union[int, None] = None

    def validate(self) -> None:
        _check(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        _check(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0, got {self.eval_batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        for key in ("limit_train", "limit_test"):
            v = getattr(self, key)
            _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                   f"data.{key} must be a positive number of samples or null (all), got {v!r}")


@dataclass
class ModelConfig:
    """Architectures (names from :func:`bsnn.models.list_models`).

    Attributes:
        teacher: full-precision teacher architecture.
        student: student architecture (binarised by :func:`bsnn.binarize_`); ``None`` = same as teacher.
        kwargs: extra keyword arguments for both constructors (e.g. ``width``, ``dropout``).
        activation: the student's activation: ``relu``, ``clip`` (trainable clip, threshold-ReLU) or ``qcfs``
            (quantisation-clip-floor-shift with ``act_levels`` levels) — design-time latency reduction.
        teacher_activation: the teacher's activation (same choices).
        act_levels: QCFS levels L.
        act_clip: initial clip λ of ``clip`` / ``qcfs``.
        teachers: further teachers of multi-teacher methods (``ca_mkd`` distils from ``[teacher, *teachers]``):
            each a registered architecture (trained like the teacher, own seed, saved as ``teacher_<i>.pt``), a
            mapping ``{name: <architecture>, kwargs: {...}}`` (kwargs over ``model.kwargs``) or the path of a bsnn
            model file (``*.pt``, used as given).
        assistants: teacher assistants of ``takd``, largest first: teacher -> assistants[0] -> ... -> student,
            each step by TAKD's loss; entries as in ``teachers`` (full precision, saved as ``assistant_<i>.pt``).
    """

    teacher: str = "small_cnn"
    student: Union[str, None] = None
    kwargs: dict = field(default_factory=dict)
    activation: str = "relu"
    teacher_activation: str = "relu"
    act_levels: int = 8
    act_clip: float = 4.0
    teachers: list = field(default_factory=list)
    assistants: list = field(default_factory=list)

    def validate(self) -> None:
        from bsnn.activations import ACTIVATIONS
        from bsnn.models import MODELS

        for act in (self.activation, self.teacher_activation):
            _check(act == "relu" or act in ACTIVATIONS,
                   f"model activation must be 'relu' or one of {ACTIVATIONS.names()}, got {act!r}")
        _check(self.act_levels >= 1 and self.act_clip > 0, "model.act_levels must be >= 1 and act_clip > 0")

        for role, name in (("teacher", self.teacher), ("student", self.student)):
            if name is not None:
                MODELS.get(name)  # raises listing valid names
        for key in ("teachers", "assistants"):
            for entry in getattr(self, key):
                name = entry.get("name") if isinstance(entry, dict) else entry
                ok = isinstance(name, str) and (name in MODELS.names() or (name.endswith(".pt") and entry is name))
                if isinstance(entry, dict):
                    ok = ok and set(entry) <= {"name", "kwargs"} and isinstance(entry.get("kwargs", {}), dict)
                _check(ok, f"model.{key} entries must be registered architectures ({', '.join(MODELS.names())}), "
                           f"{{name: <architecture>, kwargs: {{...}}}} mappings or bsnn model files (*.pt), got {entry!r}")


@dataclass
class TrainConfig:
    """Optimisation settings for one training stage (teacher or student).

    Attributes:
        epochs: number of epochs.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: weight decay on conv/linear weights (never on BN, biases or scales).
        schedule: ``"cosine"``, ``"step"`` or ``"constant"`` (stepped once per epoch).
        step_epochs: for ``step``: decay every this many epochs.
        gamma: for ``step``: multiplicative decay.
        label_smoothing: cross-entropy label smoothing.
        checkpoint_every: save a resumable checkpoint every this many epochs.
    """

    epochs: int = 5
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    checkpoint_every: int = 1

    def validate(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        for key in ("lr", "momentum", "weight_decay", "gamma", "label_smoothing"):
            v = getattr(self, key)
            _check(_finite(v), f"{key} must be a finite number, got {v!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.gamma > 0, f"gamma must be > 0, got {self.gamma}")
        _check(self.schedule in ("cosine", "step", "constant"),
               f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        _check(self.step_epochs >= 1, f"step_epochs must be >= 1, got {self.step_epochs}")
        _check(len(self.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas),
               f"betas must be two numbers in [0, 1) (Adam's (beta1, beta2), e.g. [0.9, 0.999]), got {self.betas!r}")
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


@dataclass
class BinaryConfig:
    """Weight binarisation (XNOR-Net style, weights only).

    Attributes:
        scale: ``"channel"`` (α = mean|W| per output channel), ``"layer"`` (one α) or ``"none"`` (α = 1).
        keep_first: keep the first conv/linear layer full precision.
        keep_last: keep the last conv/linear layer full precision.
        clip: latent weights are clamped to [-clip, clip]; the STE gradient is zero outside.
    """

    scale: str = "channel"
    keep_first: bool = True
    keep_last: bool = True
    clip: float = 1.0

    def validate(self) -> None:
        _check(self.scale in ("channel", "layer", "none"),
               f"binary.scale must be 'channel', 'layer' or 'none', got {self.scale!r}")
        _check(_finite(self.clip) and self.clip > 0, f"binary.clip must be a finite number > 0, got {self.clip}")


@dataclass
class DistillConfig:
    """Distillation of the binary student from a frozen teacher.

    The cross-entropy and distillation terms have separate, explicit weights. Every setting left at None takes
    the method's published value (``bsnn.distill.METHODS.get(method)``: ``default_ce_weight``,
    ``default_kd_weight``, ``default_temperature``, ``param_defaults``), so switching ``method`` gives that
    method as its authors run it; KD's are CE 0.1, KD 0.9, T = 4.

    Attributes:
        method: registered method name (see :func:`bsnn.distill.list_methods`).
        temperature: softmax temperature of logit-based methods (None: the method's published temperature).
        ce_weight: weight of the cross-entropy on the labels (None: the method's published weight).
        kd_weight: weight of the distillation term (None: the method's published weight).
        params: method-specific keyword arguments (e.g. ``{"alpha": 1, "beta": 8}`` for DKD); epoch-based
            schedules left at None (DKD's ``warmup``) scale with the run's epochs.
    """

    method: str = "kd"
    temperature: Union[float, None] = None
    ce_weight: Union[float, None] = None
    kd_weight: Union[float, None] = None
    params: dict = field(default_factory=dict)

    def validate(self) -> None:
        from bsnn.distill import METHODS

        METHODS.get(self.method).check_params(self.params)
        _check(self.temperature is None or self.temperature > 0,
               f"distill.temperature must be > 0 (or null for the method default), got {self.temperature}")
        for key in ("ce_weight", "kd_weight"):
            w = getattr(self, key)
            _check(w is None or w >= 0, f"distill.{key} must be >= 0 (or null for the method default), got {w}")




def parse_statistic(value: Any, where: str = "convert.threshold") -> Any:
    """``"max"`` -> ``Max()``; a number p or ``"p99.9"`` -> ``Percentile(p)``; Max/Percentile pass through."""
    from bsnn.convert.calibrate import Max, Percentile

    if isinstance(value, (Max, Percentile)):
        return value
    if isinstance(value, str) and value.strip().lower() == "max":
        return Max()
    if isinstance(value, str) and value.strip().lower().startswith("p"):
        value = value.strip()[1:]
    try:
        if isinstance(value, bool):
            raise ValueError
        return Percentile(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be 'max' or a percentile such as 99.9, got {value!r}") from None


def _statistic_default() -> Any:
    from bsnn.convert.calibrate import Percentile

    return Percentile(99.99)


@dataclass
class ConvertConfig:
    """ANN -> SNN conversion. The defaults are the recipe measured best in ``benchmarks/default_recipe.py``
    (per-channel p99.99 thresholds, θ/2 shift, potential calibration at T = 8: the fastest recipe that converges on
    every network tried; see ``docs/conversion.md``).

    Attributes:
        threshold: activation statistic that sets each IF layer's threshold: ``Max()`` or ``Percentile(p)``
            (YAML: ``max`` or a number such as ``99.9``).
        per_channel: per-channel thresholds where every consumer of the layer's spikes is a full-precision
            conv/linear (through pooling/flatten); layers feeding binary layers (whose weights must stay ±1) or
            residual adds stay layer-wise.
        threshold_scale: global factor applied to every threshold.
        v_init: initial membrane potential as a fraction of the threshold (0.5 = the θ/2 shift).
        calib_samples: number of training samples used for calibration.
        search_percentiles: when non-empty, the threshold percentile is chosen among these (100 = max) by the
            accuracy of the converted SNN at ``search_timesteps`` on ``search_samples`` calibration samples.
        search_timesteps: target T of the percentile search.
        search_samples: labelled calibration samples used to score the candidates.
        snn_calibration: post-conversion layer-wise correction against the ANN: ``none``, ``bias`` or
            ``potential`` (SNN Calibration, light pipeline; both add a bounded charge, so the SNN still converges).
        snn_calibration_timesteps: the T the correction is computed for (the bias current flows for that many
            timesteps).
        snn_calibration_samples: calibration samples used for the correction.
    """

    threshold: Any = field(default_factory=_statistic_default)
    per_channel: bool = True
    threshold_scale: float = 1.0
    v_init: float = 0.5
    calib_samples: int = 2048
    search_percentiles: list = field(default_factory=list)
    search_timesteps: int = 16
    search_samples: int = 512
    snn_calibration: str = "potential"
    snn_calibration_timesteps: int = 8
    snn_calibration_samples: int = 256

    def __post_init__(self) -> None:
        self.threshold = parse_statistic(self.threshold)

    @classmethod
    def plain(cls, **changes: Any) -> "ConvertConfig":
        """Plain layer-wise max-norm conversion (``Max()`` thresholds, membranes from 0, no calibration), the
        baseline of the latency literature, with ``changes`` applied."""
        return cls(**{"threshold": parse_statistic("max"), "per_channel": False, "v_init": 0.0,
                      "snn_calibration": "none", **changes})

    def validate(self) -> None:
        self.threshold = parse_statistic(self.threshold)
        _check(self.threshold_scale > 0, f"convert.threshold_scale must be > 0, got {self.threshold_scale}")
        _check(0.0 <= self.v_init < 1.0, f"convert.v_init must be in [0, 1), got {self.v_init}")
        _check(self.calib_samples >= 1, f"convert.calib_samples must be >= 1, got {self.calib_samples}")
        for p in self.search_percentiles:
            parse_statistic(p, "convert.search_percentiles")
        _check(self.search_timesteps >= 1 and self.snn_calibration_timesteps >= 1,
               "convert.search_timesteps and convert.snn_calibration_timesteps must be >= 1")
        _check(self.search_samples >= 1 and self.snn_calibration_samples >= 1,
               "convert.search_samples and convert.snn_calibration_samples must be >= 1")
        _check(self.snn_calibration in ("none", "bias", "potential"),
               f"convert.snn_calibration must be 'none', 'bias' or 'potential', got {self.snn_calibration!r}")


@dataclass
class SimConfig:
    """Simulation of the spiking network.

    Attributes:
        timesteps: every T at which accuracy is reported (one run to max(T)).
        time_chunk: timesteps folded into the batch per call (bounds peak memory; independent of T).
        encoding: ``"direct"`` (the analog image every timestep) or ``"poisson"`` (rate-coded spikes).
        kernel: IF-scan backend (see :mod:`bsnn.snn.kernels`); ``auto`` = the fused Triton kernel on CUDA, the
            fused ``inductor`` kernel on CPU where a C++ compiler exists (compiled once, a few seconds), else the
            in-place torch loop.
        synapse: arithmetic of binary layers fed by spikes (see :mod:`bsnn.snn.synapse`): ``float``, ``bf16``
            (bit-identical to float, faster), ``int`` (int8/int32 crossbar arithmetic, the integer oracle) or
            ``auto`` (bf16 on CUDA and on CPUs with native bf16, else float).
        max_samples: simulate only the first N test samples (None: all).
        record_predictions: keep every sample's prediction and logit margin at every step (``[T, N]``), the
            input of run-time early-exit analysis (:mod:`bsnn.early_exit`).
        constraints: in-memory hardware limits to simulate next to the ideal SNN (fields of
            :class:`bsnn.hardware.constraints.ConstraintConfig`: ``xbar_rows``, ``adc_bits``, ``membrane_bits``, ...);
            None = ideal only.
    """

    timesteps: list = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    time_chunk: int = 1
    encoding: str = "direct"
    kernel: str = "auto"
    synapse: str = "auto"
    max_samples: Union[int, None] = None
    record_predictions: bool = False
    constraints: Union[dict, None] = None

    def validate(self) -> None:
        _check(len(self.timesteps) > 0 and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                                               for t in self.timesteps),
               f"simulate.timesteps must be a list of positive integers (e.g. [1, 2, 4, 8]), got {self.timesteps!r}")
        _check(self.time_chunk >= 1, f"simulate.time_chunk must be >= 1, got {self.time_chunk}")
        _check(self.constraints is None or isinstance(self.constraints, dict),
               f"simulate.constraints must be a mapping of constraint settings or null, got {self.constraints!r}")
        _check(self.max_samples is None or (isinstance(self.max_samples, int) and not isinstance(self.max_samples, bool)
                                            and self.max_samples >= 1),
               f"simulate.max_samples must be a positive number of samples or null (all), got {self.max_samples!r}")
        _check(self.encoding in ("direct", "poisson"),
               f"simulate.encoding must be 'direct' or 'poisson', got {self.encoding!r}")
        from bsnn.snn.kernels import KERNELS

        if self.kernel != "auto":
            KERNELS.get(self.kernel)
        from bsnn.snn.synapse import SYNAPSE_MODES

        if self.synapse != "auto":
            SYNAPSE_MODES.get(self.synapse)
        if self.constraints is not None:
            self.constraint_config()

    def constraint_config(self):
        """The :class:`bsnn.hardware.constraints.ConstraintConfig` of ``constraints`` (validated), or None."""
        if self.constraints is None:
            return None
        from bsnn.hardware.constraints import ConstraintConfig

        return from_dict(self.constraints, ConstraintConfig).validate()


@dataclass
class CostConfig:
    """In-memory-hardware cost report added by ``bsnn run`` (see :mod:`bsnn.hardware`).

    Attributes:
        enabled: write ``cost.{json,md,png}`` after the sweep.
        preset: hardware preset (``spikesim-rram-65nm``, ``xnor-sram-65nm``, ``isaac-rram-32nm``, ``digital-45nm``).
        timesteps: T at which to cost the network (None: the largest simulated T).
        mode: ``event_driven`` (measured spike counts) or ``dense`` (every crossbar read every timestep).
    """

    enabled: bool = True
    preset: str = "spikesim-rram-65nm"
    timesteps: Union[int, None] = None
    mode: str = "event_driven"

    def validate(self) -> None:
        from bsnn.hardware import list_presets

        _check(self.preset in list_presets(), f"cost.preset must be one of {list_presets()}, got {self.preset!r}")
        _check(self.mode in ("dense", "event_driven"), f"cost.mode must be 'dense' or 'event_driven', got {self.mode!r}")
        _check(self.timesteps is None or (isinstance(self.timesteps, int) and not isinstance(self.timesteps, bool)
                                          and self.timesteps >= 1),
               f"cost.timesteps must be a positive integer or null (the largest simulated T), got {self.timesteps!r}")


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
    from bsnn.convert.calibrate import Max, Percentile

    if isinstance(obj, Max):
        return "max"
    if isinstance(obj, Percentile):
        return obj.p
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML value to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value) if (tp is tuple or origin is tuple) else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _from_dict(cls: type, d: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def from_dict(d: dict | None, cls: type = Config) -> Any:
    """Build a config dataclass (default :class:`Config`) from a nested dict, validating it."""
    cfg = _from_dict(cls, d or {})
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``"a.b=value"`` into ``(["a", "b"], value)``; the value is parsed as YAML (``3`` -> int)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``d`` with dotted ``key=value`` overrides applied."""
    import copy

    out = copy.deepcopy(d)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


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


def read_yaml_mapping(path: str | os.PathLike, what: str, hint: str) -> dict:
    """Read a YAML file that must hold a mapping; errors name the file (``what``) and say what to do (``hint``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} not found; {hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not a text file (not UTF-8); {hint}") from None
    except OSError as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read ({e.strerror or e}); {hint}") from None
    try:
        d = yaml_load(text) or {}
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {msg}; {hint}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections, got {type(d).__name__}")
    return d


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    from bsnn.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
