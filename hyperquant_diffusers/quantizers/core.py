"""Library-independent steps of the backend, shared by the diffusers and the transformers quantizer.

* :class:`OnLoadQuantizer` — quantize-on-load: both quantizers hand it each selected float weight the moment it
  loads (on the device it loads to, so on the GPU with ``device_map="cuda"``); it buffers same-shape weights and
  quantizes a group with ``kernels.quantize.quantize_many`` once it holds ``config.quantize_batch_values`` values,
  then puts the ``LatticeLinear`` modules in place. The whole float model never exists at once.
* :func:`quantize_linears` — the after-load pass for linears whose weights did not arrive through the loading hook
  (e.g. missing from the checkpoint and initialized by the library), one module at a time, with a tqdm bar; then
  every new ``LatticeLinear`` is finalized (switched to its residency), as after loading a checkpoint.
* :func:`prepare_prequantized` — loading a HyperQuant checkpoint: before the weights load (meta device), put
  empty ``LatticeLinear`` modules with the exact buffer shapes recorded in ``config.layout``.
* :func:`finalize_loaded` — after a checkpoint loaded: check every code buffer arrived, switch to the residency.
* :func:`validate_checkpoint_files` — named errors for truncated files, other format versions, wrong shapes.
* :func:`maybe_enable_kv` — the K/V-cache compression hook-up (issue 5).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import weakref

import torch
from torch import nn

from ..config import CHECKPOINT_FORMAT_VERSION, HyperQuantConfig
from ..nn.group_buffer import MAX_BUFFERED_GROUPS, GroupBuffer
from ..nn.lattice_linear import LatticeLinear, compressed_shapes
from .errors import (AdaptersLoadedError, CheckpointFormatError, CheckpointShapeError, TruncatedCheckpointError,
                     UnquantizableModuleError, UnsupportedFormatVersionError)
from .policy import plan_conversion

logger = logging.getLogger("hyperquant_diffusers")

#: safetensors metadata key carrying CHECKPOINT_FORMAT_VERSION in every file the backend saves.
METADATA_VERSION_KEY = "hyperquant_format_version"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_ST_DTYPES = {torch.uint8: "U8", torch.int32: "I32"}


class FreshConfigMixin:
    """What the diffusers and the transformers quantizer share: no extra packages to check; a private copy of the
    config when quantizing fresh weights, so that one user config reused for several ``from_pretrained`` calls does
    not carry one model's layout into another; the refusal to save a model with LoRA adapters attached
    (:func:`check_no_adapters`). List it before the library's quantizer base."""

    def __init__(self, quantization_config, **kwargs):
        if not kwargs.get("pre_quantized", True):
            quantization_config = quantization_config.fresh_copy()
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        return None

    def _remember_model(self, model: nn.Module) -> None:
        # both libraries ask is_serializable before writing anything, without passing the model
        self._model_ref = weakref.ref(model)

    def _check_saveable(self) -> bool:
        """True, or :class:`AdaptersLoadedError` when LoRA adapters are attached to the model. Brings the
        config's layout up to date first (a LoRA fused with ``fuse_lora`` re-quantizes layers: new word counts)."""
        model = self._model_ref() if getattr(self, "_model_ref", None) is not None else None
        check_no_adapters(model)
        if model is not None:
            refresh_layout(model, self.quantization_config)
        return True


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _unquantizable(name: str, lin: nn.Linear, e: Exception) -> UnquantizableModuleError:
    return UnquantizableModuleError(f"module {name!r} ({lin.out_features}x{lin.in_features}) cannot be "
                                    f"quantized: {e}")


def install_quantized(model: nn.Module, name: str, lin: nn.Linear, q, config: HyperQuantConfig) -> dict:
    """Put a LatticeLinear holding ``q`` (the LatticeTensor of ``lin``'s weight) in ``lin``'s place in ``model``;
    returns the module's ``config.layout`` entry.

    The module gets exactly the buffers a HyperQuant checkpoint would load (the ``hq_*`` stream) and is left
    unfinalized, like a checkpoint's module mid-load: ``finalize_loaded`` switches it to its residency once loading
    is over. (transformers replaces every non-persistent buffer, e.g. int8-resident codes, with an uninitialized
    one after its loading loop.) ``lin.bias`` is moved over as is; if it is still on the meta device it loads into
    the new module later.
    """
    try:
        if len(q.shape) != 2 or tuple(q.shape) != (lin.out_features, lin.in_features):
            raise ValueError(f"quantized weight has shape {tuple(q.shape)}")
        new = LatticeLinear(lin.in_features, lin.out_features, lin.bias is not None, lattice=q.lattice,
                            bits=config.bits, tile_size=q.tile_size, block_values=q.block_values, seed=q.seed,
                            mma=config.mma, residency=config.residency, n_words=int(q.words.numel()),
                            weight_dtype=q.dtype, device=q.device)
        new.load_stream(q)
    except (ValueError, ArithmeticError) as e:
        raise _unquantizable(name, lin, e) from e
    if lin.bias is not None:
        new.bias = lin.bias
        new.bias.requires_grad_(False)
    # transformers re-initializes modules and parameters without this flag after loading
    new._is_hf_initialized = True
    _set_submodule(model, name, new)
    return {"shape": [lin.out_features, lin.in_features], "dtype": _DTYPE_NAMES[q.dtype],
            "bias": lin.bias is not None, "n_words": new.n_words, "residency": config.residency}


def quantize_linear(model: nn.Module, name: str, lin: nn.Linear, weight: torch.Tensor,
                    config: HyperQuantConfig) -> dict:
    """Quantize ``weight`` (the float weight of ``lin``) alone on ``config.quantize_device_for(weight.device)`` and
    put the LatticeLinear, on the weight's device, in ``lin``'s place in ``model``; returns its layout entry."""
    from ..codec import quantize

    home = weight.device
    try:
        q = quantize(weight.detach().to(config.quantize_device_for(home)), **config.quantize_kwargs())
    except (ValueError, ArithmeticError) as e:
        raise _unquantizable(name, lin, e) from e
    return install_quantized(model, name, lin, q.to(home) if q.device != home else q, config)


class OnLoadQuantizer:
    """Quantize the planned linears of a model while its float weights load, same-shape weights batched.

    ``add(model, name, weight)`` takes the float weight of the planned ``nn.Linear`` ``name`` (already on the device
    and in the dtype it loads to). With ``config.quantize_batch_values == 0`` it is quantized at once
    (``codec.quantize``). Otherwise it waits in a buffer keyed by (shape, dtype, device); a buffer holding
    ``max(1, quantize_batch_values // numel)`` weights is quantized in one ``kernels.quantize.quantize_many`` call
    (identical to ``quantize_many`` on those weights: one codec call, the rate search's step multiplier shared by
    the group). When all buffers together exceed ``MAX_BUFFERED_GROUPS * quantize_batch_values`` values, the largest
    is quantized early. When the last planned weight has arrived, everything left is quantized, so the model is
    complete before the library's post-load steps; :meth:`finish` flushes whatever is left otherwise.

    ``layout`` collects the ``config.layout`` entries; a tqdm bar counts layers (``total`` = planned layers).
    """

    def __init__(self, names, config: HyperQuantConfig, *, progress: bool = True):
        from tqdm.auto import tqdm

        self.config = config
        self.pending: set[str] = set(names)
        self.layout: dict[str, dict] = {}
        self._home: dict[str, torch.device] = {}  # device each weight loaded to (its module ends up there)
        self.quantized_on: set[str] = set()        # devices the codec ran on
        self.batch_values = int(config.quantize_batch_values)
        self._buffer = GroupBuffer(MAX_BUFFERED_GROUPS * self.batch_values)   # (name, weight) per (shape, dtype, device)
        # diffusers can load shards in parallel threads (HF_ENABLE_PARALLEL_LOADING); one weight at a time here
        self._lock = threading.RLock()
        self.bar = tqdm(total=len(self.pending), desc="HyperQuant: quantizing linears", unit="layer",
                        disable=not progress or not self.pending)

    @property
    def max_buffered_values(self) -> int:
        """High-water mark of float values waiting in the buffers."""
        return self._buffer.high_water

    def wants(self, module_name: str) -> bool:
        """True when ``module_name`` is a planned linear whose weight has not arrived yet."""
        return module_name in self.pending

    def add(self, model: nn.Module, name: str, weight: torch.Tensor) -> None:
        with self._lock:
            self._add(model, name, weight)

    def _add(self, model: nn.Module, name: str, weight: torch.Tensor) -> None:
        if name not in self.pending:
            raise RuntimeError(f"HyperQuant: weight of {name!r} arrived twice or was not planned for quantization")
        self.pending.discard(name)
        self._home[name] = weight.device
        qdev = self.config.quantize_device_for(weight.device)
        weight = weight.detach().to(qdev)
        self.quantized_on.add(str(qdev))
        if self.batch_values <= 0:
            self._install(model, [name], [weight], per_layer=True)
        else:
            key = (tuple(weight.shape), weight.dtype, weight.device)
            due = self._buffer.add(key, (name, weight), weight.numel(), self.batch_values // weight.numel())
            del weight       # the buffer holds it: a due group's weights are freed as they are stacked
            for _, group in due:
                self._flush(model, group)
        if not self.pending:
            self.flush_all(model)

    def flush_all(self, model: nn.Module) -> None:
        for _, group in self._buffer.pop_all():
            self._flush(model, group)

    def finish(self, model: nn.Module) -> dict[str, dict]:
        """Quantize what is still buffered, close the bar; returns ``layout``."""
        with self._lock:
            self.flush_all(model)
        self.bar.close()
        return self.layout

    def _flush(self, model: nn.Module, group: list[tuple[str, torch.Tensor]]) -> None:
        names, weights = [n for n, _ in group], [w for _, w in group]
        group.clear()    # in place: the caller's loop holds this list; _quantize_group frees each weight it copies
        self._install(model, names, weights, per_layer=False)

    def _quantize_group(self, names: list[str], weights: list[torch.Tensor]) -> list:
        """``quantize_many`` of same-shape ``weights`` (a whole group; the same codes); LatticeTensors in order.
        Each weight is copied into the group's stacked buffer and its list entry set to None, so the loaded copies
        are freed before the codec runs (with ``quantize_many`` they and their concatenation were alive together
        through it)."""
        from ..kernels.quantize import quantize_filled

        kw = self.config.quantize_kwargs()
        shape, dtype, device = tuple(weights[0].shape), weights[0].dtype, weights[0].device

        def fill(i: int, out: torch.Tensor) -> None:
            out.copy_(weights[i])
            weights[i] = None

        return quantize_filled(shape, len(weights), fill, device=device, dtype=dtype, bits=kw["bits"],
                               lattice=kw["lattice"], tile_size=kw["tile_size"], seed=kw["seed"],
                               rht_signs=kw["rht_signs"], block_values=kw["block_values"],
                               max_values=max(self.batch_values, shape[0] * shape[1]))

    def _install(self, model: nn.Module, names: list[str], weights: list[torch.Tensor], *, per_layer: bool) -> None:
        # the current module object: a bias may have loaded into it after its weight was buffered
        lins = [model.get_submodule(n) for n in names]
        if per_layer:
            self.layout[names[0]] = self._install_one(model, names[0], lins[0], weights[0])
            del weights
            self.bar.update(1)
            return
        shape = tuple(weights[0].shape)
        try:
            qs = self._quantize_group(names, weights)
        except (ValueError, ArithmeticError) as e:
            raise UnquantizableModuleError(f"modules {names} ({shape}) cannot be quantized: {e}") from e
        del weights
        for name, lin, q in zip(names, lins, qs):
            home = self._home.pop(name, q.device)
            self.layout[name] = install_quantized(model, name, lin, q.to(home) if q.device != home else q,
                                                  self.config)
            self.bar.update(1)

    def _install_one(self, model: nn.Module, name: str, lin: nn.Linear, weight: torch.Tensor) -> dict:
        from ..codec import quantize

        home = self._home.pop(name, weight.device)
        try:
            q = quantize(weight, **self.config.quantize_kwargs())
        except (ValueError, ArithmeticError) as e:
            raise _unquantizable(name, lin, e) from e
        return install_quantized(model, name, lin, q.to(home) if q.device != home else q, self.config)


def quantize_linears(model: nn.Module, config: HyperQuantConfig, *, progress: bool = True,
                     done: dict | None = None) -> dict[str, str]:
    """Replace the selected linears of a loaded float ``model`` by LatticeLinear; record ``config.layout``.

    ``done``: layout entries of modules already quantized while their weights loaded (see the diffusers
    quantizer's ``create_quantized_param``); they are kept and not planned again. Returns the skipped modules
    (name -> reason); also stored as ``model._hyperquant_skipped``.
    """
    from tqdm.auto import tqdm

    convert, skipped = plan_conversion(model, config)
    layout = dict(done or {})
    bar = tqdm(convert.items(), total=len(convert), desc="HyperQuant: quantizing linears", unit="layer",
               disable=not progress or len(convert) == 0)
    for name, lin in bar:
        if lin.weight.is_meta:
            raise UnquantizableModuleError(f"module {name!r} has no weights loaded (meta device); cannot quantize")
        layout[name] = quantize_linear(model, name, lin, lin.weight, config)
        del lin
    finalize_loaded(model)  # these and the on-load modules switch to their residency now
    for name, entry in layout.items():
        entry["residency"] = model.get_submodule(name).residency  # int8 may fall back to compressed (overflow)
    config.layout = layout
    model._hyperquant_skipped = skipped
    if skipped:
        logger.info("HyperQuant left %d linear(s) in float: %s", len(skipped),
                    "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:8]))
    return skipped


def prepare_prequantized(model: nn.Module, config: HyperQuantConfig) -> None:
    """Before loading a HyperQuant checkpoint: swap the recorded linears for empty LatticeLinear modules."""
    for name, entry in config.layout.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointShapeError(f"the checkpoint's quantization layout names module {name!r}, which this "
                                       f"{type(model).__name__} does not have") from None
        if isinstance(mod, LatticeLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise CheckpointShapeError(f"module {name!r} is a {type(mod).__name__}, but the checkpoint stores it "
                                       f"as a quantized linear")
        try:
            out_f, in_f = (int(s) for s in entry["shape"])
            n_words, dtype = int(entry["n_words"]), _NAME_DTYPES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"bad quantization layout entry for {name!r}: {entry!r}") from None
        if (mod.out_features, mod.in_features) != (out_f, in_f):
            raise CheckpointShapeError(f"module {name!r} is {mod.out_features}x{mod.in_features} in the model but "
                                       f"{out_f}x{in_f} in the checkpoint's quantization layout")
        if bool(entry.get("bias", True)) != (mod.bias is not None):
            raise CheckpointShapeError(f"module {name!r}: bias presence differs between model and checkpoint")
        new = LatticeLinear(in_f, out_f, mod.bias is not None, lattice=config.lattice, bits=config.bits,
                            tile_size=config.tile_size, block_values=config.block_values, seed=config.seed,
                            mma=config.mma, residency=entry.get("residency", config.residency), n_words=n_words,
                            weight_dtype=dtype, device="meta",
                            dtype=mod.bias.dtype if mod.bias is not None else None)
        _set_submodule(model, name, new)


def finalize_loaded(model: nn.Module) -> None:
    """After a checkpoint loaded: every LatticeLinear must hold real codes; then switch to its residency."""
    for name, mod in model.named_modules():
        if isinstance(mod, LatticeLinear) and not mod.is_finalized:
            missing = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
            if missing:
                raise CheckpointFormatError(f"the checkpoint has no data for {name}.{missing[0]} "
                                            f"(missing quantized tensors)")
            mod.finalize()


def check_no_adapters(model: nn.Module | None) -> None:
    """Raise :class:`AdaptersLoadedError` when LoRA adapters wrap quantized layers of ``model`` (None: no check).

    peft puts each adapted LatticeLinear under a wrapper as ``<name>.base_layer``; a checkpoint saved so would hold
    the adapter's float matrices and quantized tensors under names the quantization layout does not know, and would
    not load. Called before anything is written.
    """
    if model is None:
        return
    wrapped = [n.removesuffix(".base_layer") for n, m in model.named_modules()
               if isinstance(m, LatticeLinear) and n.endswith("base_layer")]
    if wrapped:
        raise AdaptersLoadedError(
            f"{type(model).__name__} has LoRA (peft) wrappers on {len(wrapped)} quantized layers (e.g. "
            f"{wrapped[0]!r}); a HyperQuant checkpoint stores the quantized weights only. Call "
            f"unload_lora_weights() before save_pretrained (delete_adapters leaves the wrappers in place), and save "
            f"the LoRA itself with save_lora_weights. To bake a LoRA into the checkpoint, fuse_lora() (the layers "
            f"are re-quantized with the delta) then unload_lora_weights() before saving.")


def refresh_layout(model: nn.Module, config: HyperQuantConfig) -> None:
    """Set each ``config.layout`` entry's word count and residency from its LatticeLinear as it is now."""
    for name, entry in (config.layout or {}).items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(m, LatticeLinear):
            entry["n_words"], entry["residency"] = int(m.n_words), m.residency


def checkpoint_metadata() -> dict[str, str]:
    """safetensors metadata the backend adds to every file it saves."""
    return {METADATA_VERSION_KEY: str(CHECKPOINT_FORMAT_VERSION)}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, header length) of a safetensors file; ``TruncatedCheckpointError`` if it is cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedCheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise TruncatedCheckpointError(f"{path}: truncated safetensors file ({size} bytes; its header alone "
                                           f"needs {8 + n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise TruncatedCheckpointError(f"{path}: truncated safetensors file: {size} bytes, its header describes "
                                       f"{8 + n + end} (interrupted write or copy?)")
    return header, n


def _expected_buffers(config: HyperQuantConfig) -> dict[str, dict[str, tuple]]:
    out = {}
    for name, e in config.layout.items():
        out[name] = compressed_shapes(int(e["shape"][0]), int(e["shape"][1]), config.lattice,
                                      config.block_values, int(e["n_words"]))
    return out


def validate_checkpoint_files(files, config: HyperQuantConfig) -> None:
    """Check the safetensors files of a HyperQuant checkpoint before any tensor is read.

    Raises ``TruncatedCheckpointError``, ``UnsupportedFormatVersionError`` (file metadata other than
    CHECKPOINT_FORMAT_VERSION) or ``CheckpointShapeError`` (a quantized tensor whose shape/dtype differs from
    the layout in config.json, or that belongs to no module of the layout).
    """
    if not config.is_prequantized:
        return
    expected = _expected_buffers(config)
    by_tail: dict[tuple, list[str]] = {}
    for mod_name in expected:
        by_tail.setdefault(tuple(mod_name.split(".")[-2:]), []).append(mod_name)
    for path in files or ():
        path = str(path)
        if not path.endswith(".safetensors"):
            continue
        header, _ = read_safetensors_header(path)
        keys = [k for k in header if k != "__metadata__" and k.rsplit(".", 1)[-1].startswith("hq_")]
        meta = header.get("__metadata__") or {}
        if keys or METADATA_VERSION_KEY in meta:
            ver = meta.get(METADATA_VERSION_KEY)
            if ver is None:
                raise CheckpointFormatError(f"{path}: holds HyperQuant tensors but no {METADATA_VERSION_KEY!r} "
                                            f"metadata")
            if ver != str(CHECKPOINT_FORMAT_VERSION):
                raise UnsupportedFormatVersionError(
                    f"{path}: HyperQuant checkpoint format version {ver} is not supported by this release "
                    f"(reads version {CHECKPOINT_FORMAT_VERSION}); re-quantize or use the matching release")
        for key in keys:
            mod_path, buf = key.rsplit(".", 1)
            # Loaders may rename module prefixes (transformers' key mappings, e.g. Gemma 3's
            # "language_model.model.layers..." vs "model.language_model.layers..."): pick the layout module sharing
            # the longest tail of dotted components (at least the last two).
            parts = mod_path.split(".")
            best, best_score = None, 1
            for m in by_tail.get(tuple(parts[-2:]), ()):
                mp = m.split(".")
                score = 0
                while score < min(len(mp), len(parts)) and mp[-1 - score] == parts[-1 - score]:
                    score += 1
                if score > best_score:
                    best, best_score = m, score
            if best is None:
                raise CheckpointShapeError(f"{path}: quantized tensor {key!r} matches no module of the checkpoint's "
                                           f"quantization layout")
            shape, dtype = expected[best][buf]
            got_shape = tuple(int(s) for s in header[key]["shape"])
            if got_shape != tuple(shape) or header[key]["dtype"] != _ST_DTYPES[dtype]:
                raise CheckpointShapeError(f"{path}: tensor {key!r} has shape {got_shape} ({header[key]['dtype']}), "
                                           f"the quantization layout expects {tuple(shape)} ({_ST_DTYPES[dtype]})")


def maybe_enable_kv(model: nn.Module, config: HyperQuantConfig) -> None:
    """Turn on K/V compression (issue 5) when the config asks for it."""
    if config.kv_bits is None and not config.cache_text_kv:
        return
    try:
        from ..kv import enable_kv_compression
    except ImportError as e:
        raise NotImplementedError(
            "HyperQuantConfig(kv_bits=..., cache_text_kv=...) needs hyperquant_diffusers.kv.enable_kv_compression, "
            f"which this installation does not provide ({e})") from e
    enable_kv_compression(model, kv_bits=config.kv_bits, lattice=config.kv_lattice,
                          bias_correction=config.kv_bias_correction, cache_text_kv=config.cache_text_kv,
                          tile_size=config.kv_tile_size)
