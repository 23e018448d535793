"""Quantized layers inside CUDA graphs: ``torch.cuda.graph`` capture and ``torch.compile(mode="reduce-overhead")``.

A graph replays the captured kernels without running HyperQuant's Python, so whatever that Python decides per call
must either be captured correctly or refused. References: the same layers run eagerly (the kernels are
deterministic, so a replay must equal the eager call bit for bit), and the eager tiny pipeline's video.
All GPU-only: CUDA graphs need CUDA."""

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn

from hyperquant_diffusers.nn import LatticeLinear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")]


class _Block(nn.Module):
    """q/k/v on one input (the eager activation-sharing case), an output layer on their product."""

    def __init__(self, width: int, residency: str, mma: str):
        super().__init__()

        def q(n_out):
            return LatticeLinear.from_linear(nn.Linear(width, n_out, device="cuda", dtype=torch.bfloat16),
                                             bits=4.0, residency=residency, mma=mma)

        self.q, self.k, self.v, self.o = q(width), q(width), q(width), q(width)

    def forward(self, x):
        a, b, c = self.q(x), self.k(x), self.v(x)
        return self.o(a * b + c)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("residency", ["int8", "compressed"])
@pytest.mark.parametrize("mma", ["int8", "fp8"])
def test_cuda_graph_replay_equals_eager(residency, mma):
    """Two blocks captured in one graph after eager warm-up calls: the replay equals the eager output bit for bit,
    also after the input changes (the graph recomputes, nothing is cached across replays), and eager calls after
    the capture still equal it (the capture left the decode prefetch and the activation sharing as they were)."""
    torch.manual_seed(0)
    blocks = [_Block(1024, residency, mma) for _ in range(2)]

    def model(x):
        for blk in blocks:
            x = blk(x)
        return x

    x = torch.randn(600, 1024, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        for _ in range(3):
            want = model(x)
        want2 = model(x2)
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = model(static_x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, want)
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, want2)
        assert torch.equal(model(x), want) and torch.equal(model(x2), want2)
        assert static_y.float().std() > 0


def test_capture_of_a_layer_never_run_names_the_warm_up():
    lin = LatticeLinear.from_linear(nn.Linear(512, 512, device="cuda", dtype=torch.bfloat16), bits=4.0,
                                    residency="compressed", mma="int8")
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="never run outside a capture"), torch.no_grad(), torch.cuda.graph(g):
        lin(x)
    torch.cuda.synchronize()
    with torch.no_grad():
        torch.testing.assert_close(lin(x).float(), lin.reference_forward(x).float(), rtol=0.05, atol=0.05)


def _tiny_ltx2(tiny_ltx2_path, residency):
    from diffusers import LTX2Pipeline, PipelineQuantizationConfig

    import hyperquant_diffusers  # noqa: F401  (registers the backend)

    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": 64,
                                                  "residency": residency},
        components_to_quantize=["transformer"]))
    return pipe.to("cuda")


@pytest.mark.parametrize("residency", ["int8", "compressed"])
def test_reduce_overhead_tiny_ltx2_matches_eager(tiny_ltx2_path, residency):
    """``torch.compile(transformer, mode="reduce-overhead")``: Inductor keeps its CUDA graphs (no skip), and the
    video equals the eager one to float32 rounding, in the run that records the graphs and in one that replays
    them."""
    from torch._dynamo.utils import counters

    from hyperquant_diffusers.testing import run_tiny_pipeline

    pipe = _tiny_ltx2(tiny_ltx2_path, residency)
    eager = run_tiny_pipeline(pipe)
    counters.clear()
    pipe.transformer = torch.compile(pipe.transformer, mode="reduce-overhead", fullgraph=True)
    first = run_tiny_pipeline(pipe)
    second = run_tiny_pipeline(pipe)
    assert counters["inductor"]["cudagraph_skips"] == 0 and not counters["graph_break"]
    assert np.abs(first - eager).max() < 1e-3 and np.abs(second - eager).max() < 1e-3
    assert eager.std() > 0.01


def test_kv_compression_refuses_cuda_graph_capture(tiny_ltx2_path):
    from hyperquant_diffusers.kv import enable_kv_compression
    from hyperquant_diffusers.testing import run_tiny_pipeline

    pipe = _tiny_ltx2(tiny_ltx2_path, "int8")
    enable_kv_compression(pipe.transformer, kv_bits=4.0, lattice="E8", bias_correction="dither",
                          cache_text_kv=True)
    run_tiny_pipeline(pipe)
    pipe.transformer = torch.compile(pipe.transformer, mode="reduce-overhead")
    with pytest.raises(RuntimeError, match="K/V compression cannot run inside a CUDA graph capture"):
        run_tiny_pipeline(pipe)
        run_tiny_pipeline(pipe)
