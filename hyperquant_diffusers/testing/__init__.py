"""Test helpers: tiny offline pipelines (see :mod:`hyperquant_diffusers.testing.tiny`)."""

from .tiny import build_tiny_ltx2_pipeline, build_tiny_ltx_pipeline, run_tiny_pipeline

__all__ = ["build_tiny_ltx2_pipeline", "build_tiny_ltx_pipeline", "run_tiny_pipeline"]
