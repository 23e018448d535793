"""The diffusers side: ``HyperQuantDiffusersQuantizer`` (a ``DiffusersQuantizer``), registered as "hyperquant"."""

from __future__ import annotations

from diffusers.quantizers.base import DiffusersQuantizer

from . import core
from .core import FreshConfigMixin


class HyperQuantDiffusersQuantizer(FreshConfigMixin, DiffusersQuantizer):
    """Quantize-on-load and pre-quantized loading of diffusers models (LTX-2 / LTX-Video transformers...).

    Fresh weights load in float (on the target device), then each selected linear is quantized in place
    (``_process_model_after_weight_loading``). A HyperQuant checkpoint (config carries ``layout``) gets empty
    ``LatticeLinear`` modules before loading and its integer code buffers load as-is.
    """

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if self.pre_quantized:
            core.validate_checkpoint_files(checkpoint_files, self.quantization_config)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if self.pre_quantized and self.quantization_config.bits is not None:
            if not self.quantization_config.is_prequantized:
                from .errors import CheckpointFormatError

                raise CheckpointFormatError("the model's quantization_config has no 'layout': not a checkpoint "
                                            "saved by the hyperquant backend")
            core.prepare_prequantized(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.bits is not None:
            if self.pre_quantized:
                core.finalize_loaded(model)
            else:
                core.quantize_linears(model, cfg)
                self.pre_quantized = True  # from now on the model holds codes (e.g. for save_pretrained)
        model_cfg = getattr(model, "config", None)
        if model_cfg is not None and model_cfg.get("quantization_config", None) is not cfg:
            model.register_to_config(quantization_config=cfg)
        core.maybe_enable_kv(model, cfg)
        return model

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        return state_dict, core.checkpoint_metadata()

    @property
    def is_serializable(self):
        return True

    @property
    def supports_safetensors_serialization(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return False
