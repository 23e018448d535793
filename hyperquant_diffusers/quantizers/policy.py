"""Which ``nn.Linear`` modules the backend quantizes, and why the others are left in float.

A linear is quantized when all hold:

1. it sits in the repeated blocks (name contains ``transformer_blocks.``, ``layers.`` or ``block.``): the
   attention projections (to_q/k/v/out, q/k/v/o_proj, SelfAttention.q/k/v/o) and feed-forward / MLP layers. They
   hold >95% of the weights of LTX-2, LTX-Video, Gemma 3 and T5, and are where the time goes.
2. its name contains none of ``DEFAULT_MODULES_TO_NOT_CONVERT`` nor the user's ``modules_to_not_convert``:
   patch embeddings / ``proj_in`` / ``proj_out`` (tiny, touch the latents directly: quantization error there is
   not averaged by any later layer), timestep embedders and AdaLN / scale-shift / gate modulations (they set
   every block's scale and shift; tiny), caption projections (run once per prompt; tiny), norms, token
   embeddings and ``lm_head``, the Gemma vision tower and its projector (never run by the LTX-2 pipeline).
3. ``in_features`` is a multiple of ``tile_size`` (the RHT works on whole tiles).
4. it has at least ``min_weight_numel`` weights (default 4096): below that the per-layer side information (block
   headers, one float32 step per row, the signs) costs more than ~1.3 bits per weight, so it does not pay off.
"""

from __future__ import annotations

from torch import nn

from ..config import HyperQuantConfig
from ..nn.lattice_linear import LatticeLinear
from .errors import UnquantizableModuleError

DEFAULT_MODULES_TO_NOT_CONVERT = (
    "proj_in", "proj_out", "patch", "embed", "time_embed", "caption_projection", "scale_shift", "_gate",
    "adaln", "norm", "lm_head", "vision_tower", "multi_modal_projector", "to_gate_logits",
)
BLOCK_MARKERS = ("transformer_blocks.", "layers.", "block.")


def plan_conversion(model: nn.Module, config: HyperQuantConfig) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Split the model's ``nn.Linear`` modules into (to quantize: name -> module, skipped: name -> reason).

    Raises ``UnquantizableModuleError`` when a linear named exactly in ``config.modules_to_convert`` fails a
    shape/size rule.
    """
    convert: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    explicit = set(config.modules_to_convert or ())
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, LatticeLinear):  # already quantized: nothing to plan
            continue
        reason = None
        if config.modules_to_convert is not None and not any(p in name for p in config.modules_to_convert):
            reason = "not in modules_to_convert"
        elif any(p in name for p in config.modules_to_not_convert):
            reason = "in modules_to_not_convert"
        elif name not in explicit and any(p in name for p in DEFAULT_MODULES_TO_NOT_CONVERT):
            hit = next(p for p in DEFAULT_MODULES_TO_NOT_CONVERT if p in name)
            reason = f"default exclusion ({hit!r}: embedding/modulation/projection/norm, small or sensitive)"
        elif name not in explicit and not any(m in name for m in BLOCK_MARKERS):
            reason = "outside the repeated transformer blocks"
        elif mod.in_features % config.tile_size:
            reason = f"in_features={mod.in_features} is not a multiple of tile_size={config.tile_size}"
        elif mod.in_features % 8:
            reason = f"in_features={mod.in_features} is not a multiple of 8"
        elif mod.in_features * mod.out_features < config.min_weight_numel:
            reason = (f"too small ({mod.out_features}x{mod.in_features} < min_weight_numel="
                      f"{config.min_weight_numel}): side information would not pay off")
        if reason is None:
            convert[name] = mod
        else:
            if name in explicit and reason.startswith(("in_features", "too small")):
                raise UnquantizableModuleError(f"module {name!r} was asked to be quantized but cannot be: {reason}")
            skipped[name] = reason
    return convert, skipped
