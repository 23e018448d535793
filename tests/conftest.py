"""Shared pytest fixtures: tiny offline LTX-2 / LTX-Video pipelines saved once per session.

``tiny_ltx2_path`` / ``tiny_ltx_path`` are folders that ``LTX2Pipeline.from_pretrained`` /
``LTXPipeline.from_pretrained`` load offline (random weights, word-level tokenizer); see
:mod:`hyperquant_diffusers.testing.tiny`. Treat them as read-only.
"""

import os

import pytest
import torch

# Triton decorates kernels when their module is first imported, and picks interpreter or GPU mode then; any
# test module may import the kernels first (through LatticeLinear), so choose the mode here, before all of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny tensor ops: with 2 threads on a loaded 2-core machine each op pays a thread
    handshake of milliseconds. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after the test, so compiled graphs and recompile counts start from zero.
    Use with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
