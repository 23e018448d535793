"""hyperquant-diffusers: HyperQuant lattice quantization for diffusers (LTX-2, LTX-Video).

``import hyperquant_diffusers`` registers the "hyperquant" quantization backend with diffusers and transformers
(when they are installed), so ``quantization_config=HyperQuantConfig(...)`` and
``PipelineQuantizationConfig(quant_backend="hyperquant", ...)`` work, and saved HyperQuant checkpoints reload.
"""

try:  # the codec alone needs only torch; the backend needs diffusers + transformers
    from .config import CHECKPOINT_FORMAT_VERSION, HyperQuantConfig, HyperQuantConfigError
    from .nn import LatticeLinear, memory_footprint
    from .quantizers import register as _register
    from .quantizers.errors import (AdaptersLoadedError, CheckpointFormatError, CheckpointShapeError,
                                    TruncatedCheckpointError, UnquantizableModuleError, UnsupportedFormatVersionError)
    from .quantizers.save import save_pretrained_atomic
except ImportError as _e:  # pragma: no cover - exercised only without diffusers/transformers
    if not any(m in str(_e) for m in ("diffusers", "transformers")):
        raise
else:
    _register()

__all__ = ["AdaptersLoadedError", "HyperQuantConfig", "HyperQuantConfigError", "LatticeLinear", "memory_footprint",
           "CheckpointFormatError", "CheckpointShapeError", "TruncatedCheckpointError", "UnquantizableModuleError",
           "UnsupportedFormatVersionError", "CHECKPOINT_FORMAT_VERSION", "save_pretrained_atomic"]
