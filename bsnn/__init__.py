"""bsnn: binary spiking neural networks.

Train binary-weight ANNs by distillation from full-precision teachers, convert them layerwise to binary
spiking networks, simulate them over timesteps and estimate their in-memory-hardware cost.
"""

from bsnn import distill
from bsnn.binary import BinaryConv2d, BinaryLinear, binarize_, clamp_latent_
from bsnn.config import BinaryConfig, Config, DataConfig, DistillConfig, ModelConfig, RunConfig, TrainConfig, load_config
from bsnn.errors import BsnnError, CheckpointError, ConfigError, ConversionError, DataError
from bsnn.models import create_model, list_models
from bsnn.train import evaluate, train_student, train_teacher

__version__ = "0.1.0"

__all__ = [
    "BinaryConfig", "BinaryConv2d", "BinaryLinear", "BsnnError", "CheckpointError", "Config", "ConfigError",
    "ConversionError", "DataConfig", "DataError", "DistillConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "binarize_", "clamp_latent_", "create_model", "distill", "evaluate", "list_models", "load_config",
    "train_student", "train_teacher",
]
