"""Pure PyTorch models of mmbatch: encoders, fusion, training, evaluation, checkpoints.

The encoder modules (``models.image``, ``models.text``, ``models.audio``, and
``models.registry``, which builds them) are not re-exported here, so that importing the light
modules does not import timm or transformers.
"""

from models.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from models.explain import explain
from models.fusion import FusionClassifier, FusionConfig, FusionOutput
from models.training import FeatureSet, TrainConfig, evaluate, fit, predict, stratified_split

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "FusionClassifier",
    "FusionConfig",
    "FusionOutput",
    "TrainConfig",
    "evaluate",
    "explain",
    "fit",
    "load_checkpoint",
    "predict",
    "save_checkpoint",
    "stratified_split",
]
