"""hyperquant-diffusers: HyperQuant lattice quantization for diffusers (LTX-2, LTX-Video)."""
