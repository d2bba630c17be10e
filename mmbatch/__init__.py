"""mmbatch: batch processing for multimodal machine learning."""

__version__ = "0.1.0"
