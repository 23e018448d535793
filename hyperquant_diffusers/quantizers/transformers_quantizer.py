"""The transformers side: ``HyperQuantHfQuantizer`` (an ``HfQuantizer``) for the text encoders (Gemma 3, T5).

Fresh weights are quantized while they load, through transformers 5's on-load hooks: ``param_needs_quantization``
marks the weight of every planned linear, and the loader runs ``get_quantize_ops()`` (a ``ConversionOps``) on each
such weight right after reading it (to its ``device_map`` device). The op hands the weight to the shared
:class:`core.OnLoadQuantizer` (same-shape batching, as on the diffusers side) and returns nothing for the loader to
set, so no float copy of a quantized linear is kept.
"""

from __future__ import annotations

from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from . import core
from .core import FreshConfigMixin


class HyperQuantQuantizeOp(ConversionOps):
    """transformers' on-load conversion op: ``{param_name: [float weight]}`` -> ``{}`` (the module is replaced).

    Weights of other params (a converter may group several) are passed through unchanged. An error while
    quantizing is kept on the quantizer and re-raised, with its own type, after loading: transformers would
    otherwise turn it into a generic loading report.
    """

    def __init__(self, hf_quantizer: "HyperQuantHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        hq = self.hf_quantizer
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name, _, leaf = key.rpartition(".")
            on_load = hq._on_load
            if leaf != "weight" or on_load is None or not on_load.wants(module_name):
                out[key] = value
                continue
            if missing_keys is not None:
                missing_keys.discard(key)
            if hq._load_error is not None:
                continue
            try:
                # the dtype the float model would have held (the loader does not cast params it hands to us)
                ref = model.get_submodule(module_name).weight
                on_load.add(model, module_name, value.to(ref.dtype))
            except Exception as e:  # noqa: BLE001 - re-raised after loading, see the class docstring
                hq._load_error = e
        return out

    @property
    def reverse_op(self):
        raise NotImplementedError("HyperQuant text encoders save their codes, not float weights")


class HyperQuantHfQuantizer(FreshConfigMixin, HfQuantizer):
    """Same behaviour as the diffusers quantizer, through transformers' loading hooks.

    K/V compression knobs are not applied to text encoders (they run once per prompt).
    """

    requires_calibration = False
    required_packages = None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        self._on_load, self._load_error = None, None
        if self.pre_quantized and cfg.bits is not None:
            if not cfg.is_prequantized:
                from .errors import CheckpointFormatError

                raise CheckpointFormatError("the model's quantization_config has no 'layout': not a checkpoint "
                                            "saved by the hyperquant backend")
            core.validate_checkpoint_files(checkpoint_files, cfg)
            core.prepare_prequantized(model, cfg)
        elif cfg.bits is not None:
            convert, _ = core.plan_conversion(model, cfg)
            self._on_load = core.OnLoadQuantizer(convert, cfg)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        on_load = getattr(self, "_on_load", None)
        module_name, _, leaf = param_name.rpartition(".")
        return not self.pre_quantized and on_load is not None and leaf == "weight" and on_load.wants(module_name)

    def get_quantize_ops(self):
        return HyperQuantQuantizeOp(self)

    @property
    def quantized_element_size(self) -> float | None:
        """Bytes per weight after loading (transformers sizes its GPU allocator warm-up and ``device_map="auto"``
        with it): int8 codes, or the Rice stream at ~bits/8. Per-row steps and signs are not counted."""
        cfg = self.quantization_config
        if self.pre_quantized or cfg.bits is None:
            return None
        return 1.0 if cfg.residency == "int8" else cfg.bits / 8

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.bits is not None:
            if self.pre_quantized:
                core.finalize_loaded(model)
            else:
                on_load, self._on_load = getattr(self, "_on_load", None), None
                err, self._load_error = getattr(self, "_load_error", None), None
                if err is not None:
                    raise err
                done = on_load.finish(model) if on_load is not None else None
                # linears not loaded through the hook (missing from the checkpoint, initialized by transformers)
                core.quantize_linears(model, cfg, done=done)
                self.pre_quantized = True
        model.config.quantization_config = cfg
        self._remember_model(model)
        return model

    def get_state_dict_and_metadata(self, model):
        return None, core.checkpoint_metadata()

    def is_serializable(self):
        # raises AdaptersLoadedError, naming the layers, when LoRAs are attached. That includes transformers' own
        # adapter-only save after load_adapter: its peft integration (transformers 5.24) needs peft >= 0.22, which no
        # registry we can reach has, so that path is untested here and refused rather than trusted
        return self._check_saveable()

    @property
    def is_trainable(self):
        return False

    def is_compileable(self) -> bool:
        return False
