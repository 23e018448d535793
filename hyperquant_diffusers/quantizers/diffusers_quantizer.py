"""The diffusers side: ``HyperQuantDiffusersQuantizer`` (a ``DiffusersQuantizer``), registered as "hyperquant"."""

from __future__ import annotations

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from ..nn.lora import batch_fuse_lora
from . import core
from .core import FreshConfigMixin


class HyperQuantDiffusersQuantizer(FreshConfigMixin, DiffusersQuantizer):
    """Quantize-on-load and pre-quantized loading of diffusers models (LTX-2 / LTX-Video transformers...).

    Fresh weights: each selected linear's weight is handed, as it loads and on its target device, to a
    :class:`core.OnLoadQuantizer` (``create_quantized_param``), which quantizes same-shape weights in batches; any
    selected linear loaded another way is quantized in ``_process_model_after_weight_loading``. A HyperQuant
    checkpoint (config carries ``layout``) gets empty ``LatticeLinear`` modules before loading and its integer code
    buffers load as-is.
    """

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if self.pre_quantized:
            core.validate_checkpoint_files(checkpoint_files, self.quantization_config)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        self._on_load = None
        if self.pre_quantized and self.quantization_config.bits is not None:
            if not self.quantization_config.is_prequantized:
                from .errors import CheckpointFormatError

                raise CheckpointFormatError("the model's quantization_config has no 'layout': not a checkpoint "
                                            "saved by the hyperquant backend")
            core.prepare_prequantized(model, self.quantization_config)
        elif self.quantization_config.bits is not None:
            # Fresh weights: the modules to quantize are known from the (meta) model; each weight is quantized
            # (batched per shape) as it arrives, on the device it loads to, so loading never holds the whole float
            # model. Modules loaded some other way are caught after loading.
            convert, _ = core.plan_conversion(model, self.quantization_config)
            self._on_load = core.OnLoadQuantizer(convert, self.quantization_config)
        return model

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        module, _, leaf = param_name.rpartition(".")
        on_load = getattr(self, "_on_load", None)
        return not self.pre_quantized and leaf == "weight" and on_load is not None and on_load.wants(module)

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict, unexpected_keys,
                               **kwargs):
        device = torch.device(target_device) if not isinstance(target_device, torch.device) else target_device
        self._on_load.add(model, param_name.rpartition(".")[0], param_value.to(device))

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.bits is not None:
            if self.pre_quantized:
                core.finalize_loaded(model)
            else:
                on_load = getattr(self, "_on_load", None)
                done = on_load.finish(model) if on_load is not None else None
                self._on_load = None
                core.quantize_linears(model, cfg, done=done)
                self.pre_quantized = True  # from now on the model holds codes (e.g. for save_pretrained)
        model_cfg = getattr(model, "config", None)
        if model_cfg is not None and model_cfg.get("quantization_config", None) is not cfg:
            model.register_to_config(quantization_config=cfg)
        core.maybe_enable_kv(model, cfg)
        # fuse_lora re-quantizes same-shape layers together, in groups as large as when the model loaded
        batch_fuse_lora(model, group_values=max(1, cfg.quantize_batch_values))
        self._remember_model(model)
        return model

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        return state_dict, core.checkpoint_metadata()

    @property
    def is_serializable(self):
        return self._check_saveable()  # raises AdaptersLoadedError, naming the layers, when LoRAs are attached

    @property
    def supports_safetensors_serialization(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return False
