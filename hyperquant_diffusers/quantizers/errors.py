"""Named errors of the backend (all ``ValueError`` subclasses, so ``except ValueError`` still catches them)."""

from ..codec import FormatError
from ..config import HyperQuantConfigError


class CheckpointFormatError(FormatError):
    """A HyperQuant checkpoint is malformed (base class of the checkpoint errors below)."""


class UnsupportedFormatVersionError(CheckpointFormatError):
    """The checkpoint was written with a format version this release does not read."""


class TruncatedCheckpointError(CheckpointFormatError):
    """A safetensors file is shorter than its header says (interrupted copy or write)."""


class CheckpointShapeError(CheckpointFormatError):
    """A stored tensor's shape does not match the model / the quantization layout."""


class UnquantizableModuleError(ValueError):
    """A module that was asked to be quantized cannot be (shape, size, non-finite weights...)."""


class AdaptersLoadedError(ValueError):
    """A quantized model with LoRA (peft) adapters attached was asked to save itself as a HyperQuant checkpoint."""


__all__ = ["AdaptersLoadedError", "HyperQuantConfigError", "CheckpointFormatError", "UnsupportedFormatVersionError",
           "TruncatedCheckpointError", "CheckpointShapeError", "UnquantizableModuleError"]
