"""Pure PyTorch models of mmbatch: encoders, fusion, training loop and checkpoint format.

The encoder classes live in ``models.image``, ``models.text`` and ``models.audio`` and are not
re-exported here, so that importing this package does not import timm or transformers; build
them with :func:`build_encoder`.
"""

from models.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from models.device import pick_device
from models.explain import explain
from models.fusion import STRATEGIES, FusionClassifier, FusionConfig, FusionOutput
from models.losses import LOSSES
from models.registry import MODALITIES, SPECS, Encoder, EncoderSpec, build_encoder
from models.training import FeatureSet, TrainConfig, evaluate, fit, predict, stratified_split

__all__ = [
    "FORMAT_VERSION",
    "LOSSES",
    "MODALITIES",
    "SPECS",
    "STRATEGIES",
    "Encoder",
    "EncoderSpec",
    "FeatureSet",
    "FusionClassifier",
    "FusionConfig",
    "FusionOutput",
    "TrainConfig",
    "build_encoder",
    "evaluate",
    "explain",
    "fit",
    "load_checkpoint",
    "pick_device",
    "predict",
    "save_checkpoint",
    "stratified_split",
]
