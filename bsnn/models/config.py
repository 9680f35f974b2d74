"""The ``model`` section: :class:`ModelConfig`, validated against the architecture and activation registries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from bsnn._validate import _check
from bsnn.activations import ACTIVATIONS
from bsnn.models import MODELS
from bsnn.zoo import PREFIX, card, is_zoo


@dataclass
class ModelConfig:
    """Architectures (names from :func:`bsnn.models.list_models`, or ``torchvision:<name>`` for torchvision's
    classification models, e.g. ``torchvision:resnet18``).

    Attributes:
        teacher: full-precision teacher architecture, or ``zoo:<name>``: a released teacher, used as it is (not
            trained; the student defaults to its architecture).
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
        student_init: a trained student (bsnn model file ``*.pt`` or ``zoo:<name>``) the student starts from instead
            of a random initialisation: same architecture, binarisation and width; activation parameters it lacks
            (the QCFS / clip λ of a ReLU network) start at the 99.9th percentile of its activations on the
            calibration images. E.g. QCFS fine-tuning of a trained ReLU student (design-time latency reduction
            without training from scratch).
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
    student_init: Union[str, None] = None

    def validate(self) -> None:
        for act in (self.activation, self.teacher_activation):
            _check(act == "relu" or act in ACTIVATIONS,
                   f"model activation must be 'relu' or one of {ACTIVATIONS.names()}, got {act!r}")
        _check(self.act_levels >= 1 and self.act_clip > 0, "model.act_levels must be >= 1 and act_clip > 0")

        for role, name in (("teacher", self.teacher), ("student", self.student)):
            if name is not None and role == "teacher" and is_zoo(name):
                card(name[len(PREFIX):])  # raises listing the released models
            elif name is not None:
                MODELS.get(name)  # raises listing valid names
        init = self.student_init
        if init is not None and is_zoo(init):
            card(init[len(PREFIX):])  # raises listing the released models
        else:
            _check(init is None or (isinstance(init, str) and init.endswith(".pt")),
                   f"model.student_init must be a bsnn model file (*.pt) or zoo:<name>, got {init!r}")
        for key in ("teachers", "assistants"):
            for entry in getattr(self, key):
                name = entry.get("name") if isinstance(entry, dict) else entry
                ok = isinstance(name, str) and (name in MODELS or (name.endswith(".pt") and entry is name))
                if isinstance(entry, dict):
                    ok = ok and set(entry) <= {"name", "kwargs"} and isinstance(entry.get("kwargs", {}), dict)
                _check(ok, f"model.{key} entries must be registered architectures ({', '.join(MODELS.names())}), "
                           f"{{name: <architecture>, kwargs: {{...}}}} mappings or bsnn model files (*.pt), got {entry!r}")
