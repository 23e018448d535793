"""GPU kernels of hyperquant-diffusers (installed as ``hyperquant_diffusers.kernels``).

Each module holds a Triton kernel, its launcher and a pure-torch reference side by side:

* :mod:`.act_quant`   -- fused per-tile activation RHT + per-token int8 / fp8-e4m3 quantization
* :mod:`.rice_decode` -- parallel Rice block decode of E8 streams straight into int8 / fp8 lattice coordinates
* :mod:`.rank_decode` -- the same for the pair-rank-coded streams (Z, D4, A2): Rice-coded ranks -> table gathers
* :mod:`._bits`       -- the bit helpers and the unary pass both decoders share
* :mod:`.int8_gemm`   -- int8 GEMM with scales, bias and output cast fused in the epilogue; ``torch._int_mm`` and
  ``torch._scaled_mm`` (fp8) paths; float64 reference
* :mod:`.kv_quant`    -- fused K/V fake quantization: RHT, per-vector step, dithered nearest point (Z, D4, E8),
  inverse RHT in one pass
* :mod:`.lora_add`    -- a LoRA adapter's low-rank product added into a layer output in one pass
* :mod:`.fp4`         -- nvfp4 / mxfp4 storage of the lattice output (emulated), its error
* :mod:`.quantize`    -- batched GPU quantization of many same-shape weights through the codec
* :mod:`.dispatch`    -- ``cuda_forward(module, x)`` used by ``LatticeLinear`` on CUDA (int8 / compressed residency)

Importing this package never imports Triton; kernels are compiled on first use.
"""
