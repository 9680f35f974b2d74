"""Registered, conversion-friendly architectures.

Every model here follows the rules the ANN -> SNN converter relies on: each activation is its own
``nn.ReLU`` module used exactly once, average pooling only, ``nn.Flatten`` modules, plain
Conv2d / Linear / BatchNorm / Dropout layers, and ``torch.fx.symbolic_trace`` works — except ``airbench94``, a
fast-training full-precision *teacher* (GELU, max-pooling: the converter refuses it, naming the layer).

Example:
    >>> from bsnn.models import create_model
    >>> net = create_model("small_cnn", num_classes=10, in_channels=1)
"""

from bsnn.models.registry import MODELS, create_model, list_models

# Importing the architecture modules registers them.
from bsnn.models import airbench as _airbench  # noqa: F401,E402
from bsnn.models import cnn as _cnn  # noqa: F401,E402
from bsnn.models import resnet as _resnet  # noqa: F401,E402
from bsnn.models import vgg as _vgg  # noqa: F401,E402
from bsnn.models import torchvision_models as _torchvision  # noqa: F401,E402  (the torchvision: namespace)

from bsnn.models.airbench import data_init_  # noqa: E402

__all__ = ["MODELS", "create_model", "data_init_", "list_models"]
