"""The "hyperquant" quantization backend for diffusers and transformers.

:func:`register` (run on ``import hyperquant_diffusers``) adds the quantizers and :class:`HyperQuantConfig` to
both libraries' ``AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING`` (the dicts their auto classes
and ``PipelineQuantizationConfig`` read), so ``quantization_config=HyperQuantConfig(...)``,
``PipelineQuantizationConfig(quant_backend="hyperquant", ...)`` and reloading a saved checkpoint all work.
"""

from __future__ import annotations

from ..config import QUANT_METHOD, HyperQuantConfig
from .errors import (AdaptersLoadedError, CheckpointFormatError, CheckpointShapeError, HyperQuantConfigError,
                     TruncatedCheckpointError, UnquantizableModuleError, UnsupportedFormatVersionError)

_REGISTERED = False


def register() -> None:
    """Register the backend with diffusers and transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import diffusers.quantizers.auto as d_auto
    import transformers.quantizers.auto as t_auto

    from .diffusers_quantizer import HyperQuantDiffusersQuantizer
    from .transformers_quantizer import HyperQuantHfQuantizer

    d_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = HyperQuantDiffusersQuantizer
    d_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = HyperQuantConfig
    t_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = HyperQuantHfQuantizer
    t_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = HyperQuantConfig
    _patch_diffusers_load_state_dict()
    _REGISTERED = True


def _patch_diffusers_load_state_dict() -> None:
    """Give truncated/corrupt safetensors files a named error in diffusers' loader too.

    diffusers reads a single-file checkpoint before any quantizer hook runs, so a cut-short file would surface as
    a bare safetensors error. The wrapper changes nothing on success; on failure it checks the file's header and
    raises ``TruncatedCheckpointError`` / ``CheckpointFormatError`` when that is the cause.
    """
    import diffusers.models.modeling_utils as mu

    original = mu.load_state_dict
    if getattr(original, "_hyperquant_wrapped", False):
        return

    def load_state_dict(checkpoint_file, *args, **kwargs):
        try:
            return original(checkpoint_file, *args, **kwargs)
        except Exception:
            path = str(checkpoint_file)
            if path.endswith(".safetensors"):
                from .core import read_safetensors_header

                read_safetensors_header(path)  # raises the named error if the file is truncated/corrupt
            raise

    load_state_dict._hyperquant_wrapped = True
    mu.load_state_dict = load_state_dict


__all__ = ["register", "AdaptersLoadedError", "HyperQuantConfig", "HyperQuantConfigError", "CheckpointFormatError",
           "CheckpointShapeError", "TruncatedCheckpointError", "UnquantizableModuleError",
           "UnsupportedFormatVersionError"]
