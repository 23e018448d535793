"""Attention K/V compression for LTX-Video and LTX-2: lattice-quantized K/V with inner-product bias correction,
and the text cross-attention K/V cached compressed across denoising steps (built on ``diffusers.hooks``).

```python
from hyperquant_diffusers.kv import enable_kv_compression, disable_kv_compression, kv_cache_stats
handle = enable_kv_compression(pipe.transformer, kv_bits=4.0, lattice="E8", bias_correction="dither",
                               cache_text_kv=True, cache_format="rice")   # or "int8": ~2x, faster decode
video = pipe(prompt, ...).frames
print(handle.stats())   # bytes of cached text K/V vs bf16 (now and at the peak), entries, reuse counters
disable_kv_compression(pipe.transformer)
```
"""

from .api import (KVCompressionHandle, disable_kv_compression, enable_kv_compression, get_kv_compression,
                  kv_cache_stats)
from .quantizer import (CACHE_FORMATS, METHODS, CompressedKV, KVQuantConfig, KVQuantizer, dither_error_variance,
                        qjl_error_variance)

__all__ = [
    "enable_kv_compression", "disable_kv_compression", "get_kv_compression", "kv_cache_stats",
    "KVCompressionHandle", "KVQuantConfig", "KVQuantizer", "CompressedKV", "METHODS", "CACHE_FORMATS",
    "dither_error_variance", "qjl_error_variance",
]
