"""Shared pytest fixtures: tiny offline LTX-2 / LTX-Video pipelines saved once per session.

``tiny_ltx2_path`` / ``tiny_ltx_path`` are folders that ``LTX2Pipeline.from_pretrained`` /
``LTXPipeline.from_pretrained`` load offline (random weights, word-level tokenizer); see
:mod:`hyperquant_diffusers.testing.tiny`. Treat them as read-only.
"""

import os
import sys

import pytest

# The editable install in /tmp/tv2 registers `hyperquant_diffusers` as a *namespace* package (it was installed
# before the package had an __init__.py), which would skip our __init__ (and the backend registration) when the
# repo root is not on sys.path. Put it first so the real package is imported.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ltx2_path(tmp_path_factory):
    from hyperquant_diffusers.testing import build_tiny_ltx2_pipeline

    return build_tiny_ltx2_pipeline(str(tmp_path_factory.mktemp("tiny_ltx2")))


@pytest.fixture(scope="session")
def tiny_ltx_path(tmp_path_factory):
    from hyperquant_diffusers.testing import build_tiny_ltx_pipeline

    return build_tiny_ltx_pipeline(str(tmp_path_factory.mktemp("tiny_ltx")))
