"""``HyperQuantConfig``: the one quantization config of the "hyperquant" backend (diffusers and transformers).

The same class is registered in diffusers' and transformers' quantization-config registries, so
``PipelineQuantizationConfig(quant_backend="hyperquant", quant_kwargs=...)`` can route it to both the diffusion
transformer and the text encoder. It serializes into the model's ``config.json`` under ``quantization_config``;
after quantization it also carries ``layout`` (per quantized module: weight shape, dtype, Rice stream length,
residency), which lets a saved checkpoint be rebuilt on the meta device and loaded without re-quantizing.
"""

from __future__ import annotations

import copy
import json
import math
import os
from enum import Enum
from typing import Any

import torch

from diffusers.quantizers.quantization_config import QuantizationConfigMixin as _DiffusersMixin
from transformers.utils.quantization_config import QuantizationConfigMixin as _TransformersMixin

from .codec.constants import (DEFAULT_BLOCK_VALUES, DEFAULT_GROUP_VALUES, DEFAULT_TILE, LATTICES, MAX_BITS, MAX_BLOCK_VALUES, MAX_TILE,
                              KV_METHODS, MAX_KV_BITS, MIN_BITS, MIN_BLOCK_VALUES, MIN_KV_BITS, MIN_TILE,
                              RHT_SIGN_MODES)
from .codec.stream import code_floor_bits
from .nn.lattice_linear import MMA_TYPES, RESIDENCIES  # the layer defines what it supports

#: Version of the backend's checkpoint layout (buffer names/dtypes, ``layout`` entries, safetensors metadata).
#: Bump on any change; loading another version raises ``UnsupportedFormatVersionError``.
CHECKPOINT_FORMAT_VERSION = 1
QUANT_METHOD = "hyperquant"

KV_BIAS_CORRECTIONS = KV_METHODS
#: default ``quantize_batch_values``: float values of same-shape weights stacked into one codec call while loading
#: (512 MB in bf16; ``codec.constants.DEFAULT_GROUP_VALUES``, the group size of ``kernels.quantize.quantize_many``)
DEFAULT_QUANTIZE_BATCH_VALUES = DEFAULT_GROUP_VALUES


class HyperQuantMethod(str, Enum):
    """``quant_method`` value (a ``str`` enum: diffusers reads ``quant_method.value``)."""

    HYPERQUANT = QUANT_METHOD

    def __str__(self) -> str:
        return self.value


class HyperQuantConfigError(ValueError):
    """A ``HyperQuantConfig`` argument is invalid; the message names it and the allowed values."""


def _check_float(name: str, value, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise HyperQuantConfigError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise HyperQuantConfigError(f"{name} must be in [{lo}, {hi}] bits per scalar, got {value!r}")
    return v


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise HyperQuantConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def _check_lattice(name: str, value) -> str:
    key = str(value).upper() if isinstance(value, str) else value
    if key not in LATTICES:
        raise HyperQuantConfigError(f"unknown {name} {value!r}; choose one of {sorted(LATTICES)}")
    return key


def _check_pow2(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise HyperQuantConfigError(f"{name} must be an integer power of two in [{lo}, {hi}], got {value!r}")
    v = int(value)
    if v < lo or v > hi or v & (v - 1):
        raise HyperQuantConfigError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")
    return v


class HyperQuantConfig(_DiffusersMixin, _TransformersMixin):
    """Quantization config of the "hyperquant" backend.

    Args:
        bits: target bits per weight scalar, all side information counted, in [1, 8] and above the lattice's code
            floor (``codec.stream.code_floor_bits``: E8 1.125, Z/D4/A2 0.5); ``None`` = do not quantize the linear
            layers (only the KV-cache knobs act).
        lattice: "E8" (default), "D4", "A2" or "Z".
        tile_size: RHT tile along the input dimension (power of two, 16..1024). Linears whose ``in_features`` is
            not a multiple of it are left in float (listed with the reason).
        mma: compute path on CUDA: "int8" (int8 tensor cores), "fp8" (e4m3 tensor cores) or "float"
            (dequantize to the activation dtype). The CPU path is always the float32 reference.
        residency: "int8" (decoded int8 codes + per-row float32 scales kept in memory, ~0.5x bf16; the Rice
            stream is re-derived losslessly when saving) or "compressed" (only the Rice streams are kept, ~bits/16
            of bf16, decoded at every forward). "int8" needs a lattice whose coordinates are integers (Z, D4, E8).
        modules_to_not_convert: extra module-name substrings to keep in float (added to the defaults, see
            ``hyperquant_diffusers.quantizers.policy``).
        modules_to_convert: if given, only linears whose name contains one of these substrings are candidates
            (the default exclusions still apply, except that a linear named here explicitly that cannot be
            quantized raises ``UnquantizableModuleError``).
        min_weight_numel: linears with fewer weight scalars are left in float (their side information would eat
            the budget). Default 4096.
        seed: seed of the RHT random signs.
        rht_signs: how they are drawn: "tiled" (default: one tile's signs repeated along the input dimension, which
            lets the GPU activation pass fold the sign flip into its Hadamard product) or "independent" (a sign per
            input feature, as in checkpoints quantized before 2026-12-02). Checkpoints store their signs, so this
            only matters when quantizing.
        block_values: lattice coordinates per independently decodable Rice block (power of two).
        quantize_batch_values: while fresh weights load, same-shape weights are buffered (on the device they load
            to) and quantized together in one codec call once a group holds this many values
            (``kernels.quantize.quantize_many``: the layers of a group share the rate search's step multiplier, so
            the rate is on target per group). 0 = quantize each layer alone. Bounds the float values buffered
            (at most ``MAX_BUFFERED_GROUPS`` groups' worth, see ``quantizers.core``). Default 2^28.
        quantize_device: where fresh weights are quantized. "auto" (default): on the GPU when one is available,
            even for weights that load to the CPU (the codes then move back to the weight's device; the codec on
            CPU is ~100x slower, hours for LTX-2); "weight": on the device each weight loads to; or a torch device
            string ("cuda", "cuda:1", "cpu").
        kv_bits, kv_lattice, kv_bias_correction, cache_text_kv, kv_tile_size: attention K/V compression (issue 5),
            applied to diffusers transformers after loading through ``hyperquant_diffusers.kv.enable_kv_compression``
            (``kv_tile_size``: RHT tile along the head dimension; ``None`` = the head dimension).
        layout, format_version: written by the backend after quantization; do not set by hand.
    """

    def __init__(
        self,
        bits: float | None = 4.0,
        lattice: str = "E8",
        tile_size: int = DEFAULT_TILE,
        mma: str = "int8",
        residency: str = "int8",
        modules_to_not_convert: list[str] | None = None,
        modules_to_convert: list[str] | None = None,
        min_weight_numel: int = 4096,
        seed: int = 0,
        rht_signs: str = "tiled",
        block_values: int = DEFAULT_BLOCK_VALUES,
        quantize_batch_values: int = DEFAULT_QUANTIZE_BATCH_VALUES,
        quantize_device: str = "auto",
        kv_bits: float | None = None,
        kv_lattice: str = "E8",
        kv_bias_correction: str = "dither",
        cache_text_kv: bool = False,
        kv_tile_size: int | None = None,
        layout: dict | None = None,
        format_version: int = CHECKPOINT_FORMAT_VERSION,
        **kwargs,
    ):
        if kwargs:
            raise HyperQuantConfigError(f"unknown HyperQuantConfig argument(s) {sorted(kwargs)}")
        self.quant_method = HyperQuantMethod.HYPERQUANT
        self.bits = None if bits is None else _check_float("bits", bits, MIN_BITS, MAX_BITS)
        self.lattice = _check_lattice("lattice", lattice)
        self.tile_size = _check_pow2("tile_size", tile_size, MIN_TILE, MAX_TILE)
        self.mma = _check_choice("mma", mma, MMA_TYPES)
        self.residency = _check_choice("residency", residency, RESIDENCIES)
        if self.residency == "int8" and self.lattice == "A2":
            raise HyperQuantConfigError(
                "residency='int8' needs integer lattice coordinates; A2's are not (its int8 codes are rounded). "
                "Use lattice='E8'/'D4'/'Z' or residency='compressed'")
        self.modules_to_not_convert = self._check_names("modules_to_not_convert", modules_to_not_convert)
        self.modules_to_convert = (None if modules_to_convert is None
                                   else self._check_names("modules_to_convert", modules_to_convert))
        if isinstance(min_weight_numel, bool) or not isinstance(min_weight_numel, int) or min_weight_numel < 1:
            raise HyperQuantConfigError(f"min_weight_numel must be a positive integer, got {min_weight_numel!r}")
        self.min_weight_numel = int(min_weight_numel)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise HyperQuantConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.rht_signs = _check_choice("rht_signs", rht_signs, RHT_SIGN_MODES)
        self.block_values = _check_pow2("block_values", block_values, MIN_BLOCK_VALUES, MAX_BLOCK_VALUES)
        if self.bits is not None and self.bits <= code_floor_bits(self.lattice, self.block_values):
            raise HyperQuantConfigError(
                f"bits={self.bits:g} is below what {self.lattice} can reach: its Rice-coded coordinates cost "
                f"{code_floor_bits(self.lattice, self.block_values):g} bits per scalar with every coordinate zero, "
                "before each tensor's side information. Ask for more bits, or use lattice 'Z', 'D4' or 'A2' "
                f"({code_floor_bits('Z', self.block_values):g} bits per scalar)")
        if (isinstance(quantize_batch_values, bool) or not isinstance(quantize_batch_values, int)
                or quantize_batch_values < 0):
            raise HyperQuantConfigError(f"quantize_batch_values must be a non-negative integer (0 = one layer at a "
                                        f"time), got {quantize_batch_values!r}")
        self.quantize_batch_values = int(quantize_batch_values)
        self.quantize_device = self._check_quantize_device(quantize_device)
        self.kv_bits = None if kv_bits is None else _check_float("kv_bits", kv_bits, MIN_KV_BITS, MAX_KV_BITS)
        self.kv_lattice = _check_lattice("kv_lattice", kv_lattice)
        self.kv_bias_correction = _check_choice("kv_bias_correction", kv_bias_correction, KV_BIAS_CORRECTIONS)
        if not isinstance(cache_text_kv, bool):
            raise HyperQuantConfigError(f"cache_text_kv must be True or False, got {cache_text_kv!r}")
        self.cache_text_kv = cache_text_kv
        self.kv_tile_size = (None if kv_tile_size is None
                             else _check_pow2("kv_tile_size", kv_tile_size, MIN_TILE, MAX_TILE))
        if self.bits is None and self.kv_bits is None and not self.cache_text_kv:
            raise HyperQuantConfigError("nothing to do: bits=None and neither kv_bits nor cache_text_kv is set")
        if format_version != CHECKPOINT_FORMAT_VERSION:
            from .quantizers.errors import UnsupportedFormatVersionError

            raise UnsupportedFormatVersionError(
                f"HyperQuant checkpoint format version {format_version!r} is not supported by this "
                f"hyperquant-diffusers (reads version {CHECKPOINT_FORMAT_VERSION}); re-quantize from the original "
                f"weights or use the matching release")
        self.format_version = CHECKPOINT_FORMAT_VERSION
        if layout is not None and not isinstance(layout, dict):
            raise HyperQuantConfigError("layout must be a dict written by the backend")
        self.layout = copy.deepcopy(layout) if layout else None

    @staticmethod
    def _check_quantize_device(value) -> str:
        if value in ("auto", "weight"):
            return value
        try:
            dev = torch.device(value) if isinstance(value, str) else None
        except (TypeError, RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise HyperQuantConfigError(f"quantize_device must be 'auto', 'weight', or a cpu/cuda device string, got "
                                        f"{value!r}")
        return str(value)

    def quantize_device_for(self, weight_device: torch.device) -> torch.device:
        """The device a weight loaded to ``weight_device`` is quantized on."""
        if self.quantize_device == "weight":
            return torch.device(weight_device)
        if self.quantize_device == "auto":
            if torch.device(weight_device).type == "cpu" and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device(weight_device)
        return torch.device(self.quantize_device)

    @staticmethod
    def _check_names(name, value) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise HyperQuantConfigError(f"{name} must be a list of non-empty module-name strings, got {value!r}")
        return list(value)

    # ---- state ----------------------------------------------------------------------------------------
    @property
    def is_prequantized(self) -> bool:
        """True when this config describes already-quantized weights (it carries a ``layout``)."""
        return bool(self.layout)

    def fresh_copy(self) -> "HyperQuantConfig":
        """A copy without ``layout`` (for quantizing another model with the same settings)."""
        d = self.to_dict()
        d.pop("layout", None)
        return HyperQuantConfig.from_dict(d)

    def quantize_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`hyperquant_diffusers.codec.quantize` for a weight."""
        return {"bits": self.bits, "lattice": self.lattice, "tile_size": self.tile_size, "seed": self.seed,
                "rht_signs": self.rht_signs, "block_values": self.block_values}

    # ---- (de)serialization: one implementation for both mixins ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": QUANT_METHOD, "format_version": self.format_version, "bits": self.bits,
            "lattice": self.lattice, "tile_size": self.tile_size, "mma": self.mma, "residency": self.residency,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "modules_to_convert": None if self.modules_to_convert is None else list(self.modules_to_convert),
            "min_weight_numel": self.min_weight_numel, "seed": self.seed, "rht_signs": self.rht_signs,
            "block_values": self.block_values,
            "quantize_batch_values": self.quantize_batch_values, "quantize_device": self.quantize_device,
            "kv_bits": self.kv_bits, "kv_lattice": self.kv_lattice, "kv_bias_correction": self.kv_bias_correction,
            "cache_text_kv": self.cache_text_kv, "kv_tile_size": self.kv_tile_size,
        }
        if self.layout:
            d["layout"] = copy.deepcopy(self.layout)
        return d

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        d = dict(config_dict)
        method = d.pop("quant_method", QUANT_METHOD)
        if str(getattr(method, "value", method)) != QUANT_METHOD:
            raise HyperQuantConfigError(f"not a hyperquant config (quant_method={method!r})")
        d.update(kwargs)
        config = cls(**d)
        return (config, {}) if return_unused_kwargs else config

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike):
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def update(self, **kwargs):
        """Set known attributes (re-validated); returns the unused kwargs (transformers' contract)."""
        known = {k: v for k, v in kwargs.items() if k in self.to_dict() and k != "quant_method"}
        if known:
            merged = self.to_dict()
            merged.update(known)
            self.__dict__.update(HyperQuantConfig.from_dict(merged).__dict__)
        return {k: v for k, v in kwargs.items() if k not in known}

    def get_loading_attributes(self) -> dict:
        return {}

    def __iter__(self):
        yield from copy.deepcopy(self.to_dict()).items()

    def __repr__(self) -> str:
        d = self.to_dict()
        if "layout" in d:
            d["layout"] = f"<{len(d['layout'])} quantized modules>"
        return f"HyperQuantConfig {json.dumps(d, sort_keys=True)}"
