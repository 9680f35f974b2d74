"""bsnn: binary spiking neural networks.

Train binary-weight ANNs by distillation from full-precision teachers, convert them layerwise to binary
spiking networks, simulate them over timesteps and estimate their in-memory-hardware cost.

Note: ``bsnn.convert`` and ``bsnn.simulate`` are the functions (their modules stay importable as
``bsnn.convert.graph``, ``from bsnn.simulate import run_batch``, ...).
"""

from bsnn import distill, export, hardware, zoo
from bsnn.activations import QCFS, ClipReLU, replace_activations_
from bsnn.binary import BinaryConv2d, BinaryLinear, binarize_, clamp_latent_, materialize
from bsnn.config import (BinaryConfig, Config, ConvertConfig, CostConfig, DataConfig, DistillConfig, ModelConfig,
                         RunConfig, SimConfig, TrainConfig, load_config)
from bsnn.convert import MSE, Max, Percentile, convert
from bsnn.early_exit import EarlyExit, early_exit_curve
from bsnn.errors import BsnnError, CheckpointError, ConfigError, ConversionError, DataError
from bsnn.models import create_model, list_models
from bsnn.simulate import SimResult, simulate
from bsnn.snn import SpikingNetwork
from bsnn.tandem import TandemConfig, tandem_finetune, tandem_logits
from bsnn.train import evaluate, train_student, train_teacher

__version__ = "0.1.0"

__all__ = [
    "BinaryConfig", "BinaryConv2d", "BinaryLinear", "BsnnError", "CheckpointError", "ClipReLU", "Config",
    "ConfigError", "ConversionError", "ConvertConfig", "CostConfig", "DataConfig", "DataError", "DistillConfig",
    "EarlyExit", "MSE", "Max", "ModelConfig", "Percentile", "QCFS", "RunConfig", "SimConfig", "SimResult",
    "SpikingNetwork", "TandemConfig",
    "TrainConfig", "binarize_", "clamp_latent_", "convert", "create_model", "distill", "early_exit_curve", "evaluate",
    "export", "hardware", "list_models", "load_config", "materialize", "replace_activations_", "simulate",
    "tandem_finetune", "tandem_logits", "train_student", "train_teacher",
]
