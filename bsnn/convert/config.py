"""The ``convert`` section: :class:`ConvertConfig` and :func:`parse_statistic` (YAML ``max`` / ``99.9`` / ``mse:8``
-> :class:`~bsnn.convert.calibrate.Max` / :class:`~bsnn.convert.calibrate.Percentile` /
:class:`~bsnn.convert.calibrate.MSE`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bsnn._validate import _check
from bsnn.convert.calibrate import MSE, Max, Percentile
from bsnn.convert.maxpool import MAXPOOL_STRATEGIES
from bsnn.errors import ConfigError
from bsnn.snn.neuron import FIRING_RULES
from bsnn.snn.offset import check_offset_correction


def parse_statistic(value: Any, where: str = "convert.threshold") -> Any:
    """``"max"`` -> ``Max()``; a number p or ``"p99.9"`` -> ``Percentile(p)``; ``"mse"`` / ``"mse:T"`` /
    ``"mse:T:v0"`` -> ``MSE(T, v0)`` (SNN Calibration's search; T = 8 and the conversion's v_init when left out);
    Max / Percentile / MSE pass through."""
    if isinstance(value, (Max, Percentile, MSE)):
        return value
    if isinstance(value, str) and value.strip().lower() == "max":
        return Max()
    if isinstance(value, str) and value.strip().lower().startswith("mse"):
        parts = value.strip().lower().split(":")
        try:
            if parts[0] != "mse" or len(parts) > 3:
                raise ValueError
            return MSE(int(parts[1]) if len(parts) > 1 else 8, float(parts[2]) if len(parts) > 2 else None)
        except (ValueError, ConfigError):
            raise ConfigError(f"{where}: {value!r} is not an MSE threshold; write 'mse', 'mse:T' (T an integer >= 1, "
                              "the timesteps it is fitted for) or 'mse:T:v0' (v0 in [0, 1))") from None
    if isinstance(value, str) and value.strip().lower().startswith("p"):
        value = value.strip()[1:]
    try:
        if isinstance(value, bool):
            raise ValueError
        return Percentile(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be 'max', a percentile such as 99.9 or 'mse:T', got {value!r}") from None


def _statistic_default() -> Any:
    return MSE(4)


AUTO_LATE_THRESHOLD = MSE(16)
"""What ``late_threshold: auto`` (the default) phases to where the recipe allows it."""


def parse_late_threshold(value: Any) -> Any:
    """``convert.late_threshold``: ``None`` / ``"none"`` (one threshold for all T), ``"auto"`` (the default:
    :data:`AUTO_LATE_THRESHOLD` where the recipe can phase, see :meth:`ConvertConfig.late_statistic`) or a
    statistic (:func:`parse_statistic`)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_statistic(value, "convert.late_threshold")


@dataclass
class ConvertConfig:
    """ANN -> SNN conversion. The defaults are the recipe measured best in ``benchmarks/default_recipe.py``
    (per-channel thresholds of SNN Calibration's MSE search for a 4-step code, θ/2 shift, potential calibration at
    T = 4, and after T = 8 two-phase thresholds reaching the MSE search for a 16-step code: the fastest recipe that
    converges on every network tried; see ``docs/conversion.md``).

    Attributes:
        threshold: activation statistic that sets each IF layer's threshold: ``Max()``, ``Percentile(p)`` or
            ``MSE(T)`` (SNN Calibration's least-squares search for a T-step code, :class:`~bsnn.convert.calibrate.MSE`;
            YAML: ``max``, a number such as ``99.9``, or ``mse:T``).
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
            ``potential`` (SNN Calibration, light pipeline; both add a bounded charge, so the SNN still converges),
            or ``advanced`` (SNN Calibration's advanced pipeline: layer-wise weight calibration — full-precision
            weights, ±1-weight layers' per-channel gains and biases — then ``potential``; it changes the
            network's limit to the calibrated one, see :mod:`bsnn.convert.snn_calibration`).
        snn_calibration_timesteps: the T the correction is computed for (the bias current flows for that many
            timesteps).
        snn_calibration_samples: calibration samples used for the correction.
        snn_calibration_joint_timesteps: ``potential`` / ``advanced`` only, an option (default empty: one T): when
            non-empty, the initial-membrane correction is fitted jointly over these T — each layer's
            ``e_c(T)·T/λ`` averaged over them (least squares on the charge) — instead of at
            ``snn_calibration_timesteps`` alone. ``[2, 4, 8]`` gains 0.6-4 points at T = 4-8 on the zoo's ReLU
            and QCFS students but loses 4.8 at T = 16 on a plain-ReLU VGG (``docs/conversion.md``): an option to
            choose on validation, not the default.
        snn_calibration_weight_iters: ``advanced``: Adam steps per layer of the weight calibration (authors: 5000).
        snn_calibration_weight_lr: ``advanced``: Adam's initial learning rate, cosine to 0 (authors: 1e-5).
        snn_calibration_weight_batch: ``advanced``: samples per weight-calibration step (authors: 32).
        threshold_opt: ``none`` (thresholds from ``threshold``) or ``ltb`` (local threshold balancing, Bu et al.
            2025, :mod:`bsnn.convert.ltb`: λ fitted per layer by ``ltb_iterations`` steps of
            ``λ += 2·E[(a - λ)_+]`` on the activations of the already-clipped earlier layers, per channel where
            ``per_channel`` allows it; ``threshold`` and ``search_percentiles`` are then unused).
        ltb_iterations: LTB update steps (authors' demo: 12, batches 0..11).
        ltb_batch_size: calibration samples per LTB step (authors: 100).
        maxpool: how max-pooling is converted (:mod:`bsnn.convert.maxpool`): ``spiking`` (max of running spike
            counts, exact pooled counts at every T), ``gate`` (Rueckauer et al.'s count gating), ``preact``
            (max-pool of input currents before the IF neuron, LTB's placement) or ``avg`` (replaced by average
            pooling in the ANN, for networks that will be fine-tuned).
        offset_correction: run-time, per-sample correction with pre-steps, applied wherever the SNN is simulated
            (:mod:`bsnn.snn.offset`): ``none``, ``cos`` (calibrating offset spikes, Hao et al. ICLR 2023: each
            IF layer's initial membrane shifted from ρ pre-steps) or ``srp`` (residual membrane potential, Hao et
            al. AAAI 2023: neurons whose membrane is <= 1e-3 θ after τ pre-steps are silenced); pre-steps add to
            the latency (``SimResult.pre_steps``).
        offset_pre_steps: ρ (``cos``) or τ (``srp``), the pre-steps per input (authors' default: 4).
        neuron: firing rule of the spiking layers (:data:`bsnn.snn.neuron.FIRING_RULES`): ``if`` (integrate-and-fire,
            {0, 1} spikes, the binary SNN), ``burst`` (up to ``max_burst`` spikes per step, Li & Zeng IJCAI 2022:
            threshold λ/Γ, spikes in {0, ..., Γ}) or ``signed`` (signed neurons with memory, Wang et al. IJCAI 2022:
            spikes in {−1, 0, 1}). The last two are options beyond binary spikes: a layer fed by them needs
            ``ceil(log2(Γ + 1))`` (burst) or 2 (signed) crossbar passes per timestep, which the cost model charges.
        max_burst: Γ, the most spikes a burst neuron fires per timestep (authors' code: 2; ``neuron: burst`` only).
        late_threshold: a second, larger threshold statistic (e.g. ``mse:16``, ``99.99``) for the timesteps after
            ``late_threshold_after``; ``auto`` (the default) is ``mse:16`` where the recipe allows it (IF neurons,
            thresholds from statistics, no offset correction) and none otherwise; ``none``: one threshold for
            all T (what the NIR export needs for ReLU networks; spikingjelly's carries both). The neurons
            become :class:`bsnn.snn.neuron.PhasedIFNeuron` (θ from ``threshold`` first, then k·θ, k = the
            ratio of the two statistics per layer rounded up, >= 1, k·θ at most a bounded activation's bound;
            trained thresholds keep k = 1, and layers with k = 1 stay plain IF neurons). A short code's
            threshold (``mse:4``) is fast at small T but clips for ever; the late threshold releases what it
            clipped, so the SNN converges to the long code's limit. Still {0, 1} spikes, one crossbar pass (the
            consumer scales its column sums by k).
        late_threshold_after: the timestep the late threshold starts after (``late_threshold`` only); T up to it
            are exactly those of the network without ``late_threshold``.
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
    snn_calibration_timesteps: int = 4
    snn_calibration_samples: int = 256
    snn_calibration_joint_timesteps: list = field(default_factory=list)
    maxpool: str = "spiking"
    offset_correction: str = "none"
    offset_pre_steps: int = 4
    snn_calibration_weight_iters: int = 5000
    snn_calibration_weight_lr: float = 1e-5
    snn_calibration_weight_batch: int = 32
    threshold_opt: str = "none"
    ltb_iterations: int = 12
    ltb_batch_size: int = 100
    neuron: str = "if"
    max_burst: int = 2
    late_threshold: Any = "auto"
    late_threshold_after: int = 8

    def __post_init__(self) -> None:
        self.threshold = parse_statistic(self.threshold)
        self.late_threshold = parse_late_threshold(self.late_threshold)

    def late_statistic(self) -> Any:
        """The statistic of the late phase, or None for one threshold: ``late_threshold`` resolved (``auto`` ->
        :data:`AUTO_LATE_THRESHOLD` for IF neurons with statistic thresholds and no offset correction)."""
        late = parse_late_threshold(self.late_threshold)
        if late != "auto":
            return late
        phasable = self.neuron == "if" and self.offset_correction == "none" and self.threshold_opt == "none"
        return AUTO_LATE_THRESHOLD if phasable else None

    @classmethod
    def plain(cls, **changes: Any) -> "ConvertConfig":
        """Plain layer-wise max-norm conversion (``Max()`` thresholds, membranes from 0, no calibration), the
        baseline of the latency literature, with ``changes`` applied."""
        return cls(**{"threshold": parse_statistic("max"), "per_channel": False, "v_init": 0.0,
                      "snn_calibration": "none", "late_threshold": None, **changes})

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
        check_offset_correction(self.offset_correction, self.offset_pre_steps)
        _check(self.neuron in FIRING_RULES, f"convert.neuron must be one of {', '.join(FIRING_RULES.names())}, "
                                             f"got {self.neuron!r}")
        _check(not isinstance(self.max_burst, bool) and isinstance(self.max_burst, int) and self.max_burst >= 1,
               f"convert.max_burst must be an integer >= 1 (the authors use 2), got {self.max_burst!r}")
        self.late_threshold = parse_late_threshold(self.late_threshold)
        if self.late_threshold not in (None, "auto"):
            _check(self.neuron == "if" and self.offset_correction == "none" and self.threshold_opt == "none",
                   f"convert.late_threshold phases the thresholds of IF neurons computed from statistics: it needs "
                   f"convert.neuron 'if', offset_correction 'none' and threshold_opt 'none', got "
                   f"{self.neuron!r}, {self.offset_correction!r}, {self.threshold_opt!r} (or set "
                   f"convert.late_threshold to auto or none)")
        _check(not isinstance(self.late_threshold_after, bool) and isinstance(self.late_threshold_after, int)
               and self.late_threshold_after >= 1,
               f"convert.late_threshold_after must be an integer >= 1 (a timestep), got {self.late_threshold_after!r}")
        _check(self.neuron == "if" or self.offset_correction == "none",
               f"convert.offset_correction={self.offset_correction!r} reads the membranes of IF neurons; it is not "
               f"defined for convert.neuron={self.neuron!r}: use one of them, not both")
        _check(self.maxpool in MAXPOOL_STRATEGIES,
               f"convert.maxpool must be one of {MAXPOOL_STRATEGIES.names()}, got {self.maxpool!r}")
        _check(self.snn_calibration in ("none", "bias", "potential", "advanced"),
               "convert.snn_calibration must be 'none', 'bias', 'potential' or 'advanced', got "
               f"{self.snn_calibration!r}")
        joint = self.snn_calibration_joint_timesteps
        _check(isinstance(joint, (list, tuple)) and all(not isinstance(t, bool) and isinstance(t, int) and t >= 1
                                                        for t in joint),
               f"convert.snn_calibration_joint_timesteps must be a list of integers >= 1 (e.g. [4, 8, 16]), got "
               f"{joint!r}")
        _check(not joint or self.snn_calibration in ("potential", "advanced"),
               f"convert.snn_calibration_joint_timesteps fits the initial-membrane correction: it needs "
               f"convert.snn_calibration 'potential' or 'advanced', got {self.snn_calibration!r}")
        _check(self.snn_calibration_weight_iters >= 0 and self.snn_calibration_weight_batch >= 1
               and self.snn_calibration_weight_lr >= 0,
               "convert.snn_calibration_weight_iters must be >= 0, snn_calibration_weight_batch >= 1 and "
               f"snn_calibration_weight_lr >= 0, got {self.snn_calibration_weight_iters}, "
               f"{self.snn_calibration_weight_batch}, {self.snn_calibration_weight_lr}")
        _check(self.threshold_opt in ("none", "ltb"),
               f"convert.threshold_opt must be 'none' or 'ltb', got {self.threshold_opt!r}")
        _check(self.ltb_iterations >= 1 and self.ltb_batch_size >= 1,
               f"convert.ltb_iterations and convert.ltb_batch_size must be >= 1, got {self.ltb_iterations}, "
               f"{self.ltb_batch_size}")
        _check(self.threshold_opt == "none" or not self.search_percentiles,
               "convert.threshold_opt 'ltb' fits the thresholds itself: leave convert.search_percentiles empty")
