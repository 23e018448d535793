"""The transformers side: ``HyperQuantHfQuantizer`` (an ``HfQuantizer``) for the text encoders (Gemma 3, T5)."""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer

from . import core
from .core import FreshConfigMixin


class HyperQuantHfQuantizer(FreshConfigMixin, HfQuantizer):
    """Same behaviour as the diffusers quantizer, through transformers' loading hooks.

    K/V compression knobs are not applied to text encoders (they run once per prompt).
    """

    requires_calibration = False
    required_packages = None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized and cfg.bits is not None:
            if not cfg.is_prequantized:
                from .errors import CheckpointFormatError

                raise CheckpointFormatError("the model's quantization_config has no 'layout': not a checkpoint "
                                            "saved by the hyperquant backend")
            core.validate_checkpoint_files(checkpoint_files, cfg)
            core.prepare_prequantized(model, cfg)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.bits is not None:
            if self.pre_quantized:
                core.finalize_loaded(model)
            else:
                core.quantize_linears(model, cfg)
                self.pre_quantized = True
        model.config.quantization_config = cfg
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def get_state_dict_and_metadata(self, model):
        return None, core.checkpoint_metadata()

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    def is_compileable(self) -> bool:
        return False
