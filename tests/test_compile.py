"""``torch.compile`` of models with ``LatticeLinear`` layers (``hyperquant_diffusers.nn.compiled_op``).

References: the same model run eagerly (the op runs the layer's eager forward, so the compiled layer outputs must
be bit-identical to eager ones), ``torch.library.opcheck`` for the op's registration and fake (shape) function, and
the graphs Dynamo hands to a recording backend (one op node per layer, one graph for identical blocks)."""

import copy
import gc

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn

from hyperquant_diffusers.nn import LatticeLinear

OP = torch.ops.hyperquant.lattice_linear.default
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _Block(nn.Module):
    """A transformer-like block: norm, q/k/v on one input (the eager activation-sharing case), an output layer."""

    def __init__(self, width: int, residency: str, mma: str, device="cpu", dtype=torch.float32, norm=True):
        super().__init__()
        # Inductor rounds a compiled bf16 norm differently from eager: the bit-exact GPU check goes without it
        self.norm = nn.LayerNorm(width, device=device, dtype=dtype) if norm else nn.Identity()

        def q(n_out):
            return LatticeLinear.from_linear(nn.Linear(width, n_out, device=device, dtype=dtype), bits=4.0,
                                             residency=residency, mma=mma)

        self.q, self.k, self.v, self.o = q(width), q(width), q(width // 2), q(width)

    def forward(self, x):
        h = self.norm(x)
        a, b, c = self.q(h), self.k(h), self.v(h)
        return a, b, c, self.o(torch.relu(a))


class _Recorder:
    """A torch.compile backend that keeps every FX graph it is given and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _op_nodes(gm) -> int:
    return sum(n.op == "call_function" and "hyperquant.lattice_linear" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("residency", ["int8", "compressed"])
def test_identical_blocks_compile_once_with_one_op_per_layer(residency):
    torch.manual_seed(0)
    blocks = [_Block(128, residency, "int8") for _ in range(3)]
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        want = [blk(x) for blk in blocks]
    rec = _Recorder()
    for blk in blocks:
        blk.compile(backend=rec, fullgraph=True)
    with torch.no_grad():
        got = [blk(x) for blk in blocks]
    # the layers enter the graph as tensors, not constants: one graph serves every block
    assert len(rec.graphs) == 1
    assert _op_nodes(rec.graphs[0]) == 4
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))
    # each block's op found its own layers: the blocks' weights differ, so do their outputs
    assert not torch.equal(got[0][0], got[1][0])


@pytest.mark.parametrize("residency", ["int8", "compressed"])
def test_graph_takes_the_layer_state_and_an_mma_switch_recompiles_once_per_form(residency):
    """The op's state arguments are the layer's buffers (graph inputs, not constants) and its MMA type (a guarded
    string), so switching the MMA (int8 <-> e4m3 codes; for a compressed layer only the string changes) makes Dynamo
    compile a graph for the new form once and reuse both afterwards, and every call equals the eager forward of the
    layer as it is now."""
    torch.manual_seed(5)
    lin = LatticeLinear.from_linear(nn.Linear(256, 256), bits=4.0, residency=residency, mma="int8")
    rec = _Recorder()
    f = torch.compile(lin, backend=rec, fullgraph=True)
    x = torch.randn(4, 256)
    with torch.no_grad():
        for mma in ("int8", "fp8", "int8", "fp8", "int8", "fp8"):
            lin.mma = mma
            assert torch.equal(f(x), lin.eager_forward(x))
    assert len(rec.graphs) == 2
    g = rec.graphs[0]
    (node,) = [n for n in g.graph.nodes if "hyperquant.lattice_linear" in str(n.target)]
    assert node.args[3] == "int8"
    state = node.args[4]
    assert len(state) == len(lin.resident_tensors()) and all(a.op == "placeholder" for a in state)
    names = {a.name for a in state}
    assert any(("codes" if residency == "int8" else "hq_offsets") in nm for nm in names)
    assert any("bias" in nm for nm in names)


def test_op_finds_layers_after_deepcopy():
    torch.manual_seed(1)
    blk = _Block(128, "int8", "int8")
    x = torch.randn(3, 128)
    rec = _Recorder()
    twin = copy.deepcopy(blk)
    assert int(twin.q.op_id) != int(blk.q.op_id)
    with torch.no_grad():
        want = blk(x)
        twin.q.codes.neg_()          # the copy must not be mistaken for the original, or the other way round
        want_twin = twin(x)
    twin.compile(backend=rec, fullgraph=True)
    blk.compile(backend=rec, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(twin(x)[0], want_twin[0]) and torch.equal(blk(x)[0], want[0])
        assert not torch.equal(want[0], want_twin[0])
        del twin
        assert all(torch.equal(a, b) for a, b in zip(blk(x), want))


def test_op_schema_and_fake_shapes():
    torch.manual_seed(2)
    m = LatticeLinear.from_linear(nn.Linear(256, 96), bits=4.0)
    x = torch.randn(2, 7, 256)
    torch.library.opcheck(OP, (x, m.op_id, 96, m.mma, m.resident_tensors()))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = OP(mode.from_tensor(x), mode.from_tensor(m.op_id), 96, m.mma,
                 [mode.from_tensor(t) for t in m.resident_tensors()])
    assert tuple(out.shape) == (2, 7, 96) and out.dtype == x.dtype


def test_op_rejects_unknown_layers_and_wrong_arguments():
    m = LatticeLinear.from_linear(nn.Linear(128, 64), bits=4.0)
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="no live LatticeLinear has op_id"):
        OP(x, torch.tensor([10 ** 12]), 64, "int8", [])
    with pytest.raises(ValueError, match="has 64 outputs, the call says 32"):
        OP(x, m.op_id, 32, "int8", m.resident_tensors())
    with pytest.raises(ValueError, match="computes with mma='int8', the call says 'fp8'"):
        OP(x, m.op_id, 64, "fp8", m.resident_tensors())
    with pytest.raises(ValueError, match="one-element int64"):
        OP(x, m.op_id.to(torch.int32), 64, "int8", [])
    n = int(m.op_id)
    del m
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no live LatticeLinear has op_id {n}"):
        OP(x, torch.tensor([n]), 64, "int8", [])


def test_unfinalized_layer_under_compile_names_finalize():
    m = LatticeLinear(128, 64)   # empty buffers, never loaded
    f = torch.compile(m, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="finalize"), torch.no_grad():
        f(torch.randn(2, 128))


def test_gradient_takes_the_differentiable_reference_under_compile():
    torch.manual_seed(3)
    m = LatticeLinear.from_linear(nn.Linear(128, 64), bits=4.0)
    x = torch.randn(4, 128, requires_grad=True)
    y = torch.compile(m, backend="aot_eager")(x)
    y.sum().backward()
    # d(sum(x W^T))/dx = column sums of the dequantized weight, the same for every row
    want = m.dequantize(torch.float32).sum(0).expand(4, -1)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)


def test_tiny_ltx2_pipeline_compile_repeated_blocks_matches_eager(tiny_ltx2_path):
    """The diffusers user's path: ``compile_repeated_blocks(fullgraph=True)`` (inductor) on a quantized LTX-2
    transformer: no graph breaks, and the video of the compiled pipeline equals the eager one to float32 rounding
    (inductor fuses the elementwise work around the layers differently)."""
    from diffusers import LTX2Pipeline, PipelineQuantizationConfig
    from torch._dynamo.utils import counters

    import hyperquant_diffusers  # noqa: F401  (registers the backend)
    from hyperquant_diffusers.testing import run_tiny_pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": 64},
        components_to_quantize=["transformer"]))
    n_layers = sum(isinstance(m, LatticeLinear) for m in pipe.transformer.modules())
    assert n_layers > 0
    eager = run_tiny_pipeline(pipe)
    counters.clear()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled = run_tiny_pipeline(pipe)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] >= 1
    assert np.abs(compiled - eager).max() < 1e-4
    assert compiled.std() > 0.01          # a real video, not a constant


@gpu
@needs_cuda
@pytest.mark.parametrize("residency", ["int8", "compressed"])
@pytest.mark.parametrize("mma", ["int8", "fp8"])
def test_gpu_inductor_block_bit_identical_to_eager(residency, mma):
    """On CUDA the compiled op runs the Triton kernels without activation sharing; the quantization is
    deterministic, so every layer output equals the eager (shared) one bit for bit, the decode prefetch of the
    compressed layers included (several calls, so the prefetch has learned the layer order)."""
    torch.manual_seed(4)
    blocks = [_Block(1024, residency, mma, device="cuda", dtype=torch.bfloat16, norm=False) for _ in range(2)]
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)

    def run():
        outs, h = [], x
        for blk in blocks:
            o = blk(h)
            outs.extend(o)
            h = o[3]
        return outs

    with torch.no_grad():
        run()
        want = run()
        for blk in blocks:
            blk.compile(fullgraph=True)
        for _ in range(3):
            got = run()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_tiny_ltx_video_pipeline_compile_repeated_blocks_matches_eager(tiny_ltx_path):
    """LTX-Video too (transformer and T5 text encoder quantized; the transformer's blocks compiled): one graph for
    its blocks, no graph breaks, the eager video to float32 rounding."""
    from diffusers import LTXPipeline, PipelineQuantizationConfig
    from torch._dynamo.utils import counters

    import hyperquant_diffusers  # noqa: F401  (registers the backend)
    from hyperquant_diffusers.testing import run_tiny_pipeline

    pipe = LTXPipeline.from_pretrained(tiny_ltx_path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": 64},
        components_to_quantize=["transformer", "text_encoder"]))
    eager = run_tiny_pipeline(pipe)
    counters.clear()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled = run_tiny_pipeline(pipe)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert np.abs(compiled - eager).max() < 1e-4 and compiled.std() > 0.01


#: compiled vs eager with K/V quantization on the CPU: the quantizer is discontinuous (a lattice point changes where
#: a K vector is equidistant from two; QJL's sign bits sign(S r) flip where S r is near zero), so float32 rounding
#: that Inductor does otherwise than eager (torch 2.14.1: 7.7e-7 at the output without K/V compression) moves a
#: few K/V values by one lattice step. Measured at the output: QJL 2.7e-3 (another QJL seed moves it by 0.42);
#: "dither" 8e-7 on one machine, 4.5e-3 on another (another dither seed moves it by 0.13).
_KV_COMPILED_TOL = 1e-2


@pytest.mark.parametrize("device, bias_correction, cache_text_kv, tol", [
    ("cpu", "dither", True, _KV_COMPILED_TOL), ("cpu", "qjl", False, _KV_COMPILED_TOL),
    pytest.param("cuda", "dither", True, 1e-3, marks=[gpu, needs_cuda])])
def test_tiny_ltx2_with_kv_compression_compiles_fullgraph(tiny_ltx2_path, device, bias_correction, cache_text_kv,
                                                           tol):
    """K/V compression (``hyperquant_diffusers.kv``) under ``compile_repeated_blocks(fullgraph=True)``: its steps
    are ops (``kv.compiled_ops``), so nothing breaks the graph; with the per-call seeds and the text cache reset
    before each run, the compiled video equals the eager one up to float32 rounding, which lattice points near
    ties and QJL's sign bits turn into a few one-step moves (``tol``, :data:`_KV_COMPILED_TOL`), and the cached
    text K/V are reused as often. On CUDA the ops run the GPU quantizer and the compressed text-K/V cache."""
    from diffusers import LTX2Pipeline, PipelineQuantizationConfig
    from torch._dynamo.utils import counters

    import hyperquant_diffusers  # noqa: F401  (registers the backend)
    from hyperquant_diffusers.kv import enable_kv_compression
    from hyperquant_diffusers.testing import run_tiny_pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": 64},
        components_to_quantize=["transformer"]))
    pipe.to(device)
    handle = enable_kv_compression(pipe.transformer, kv_bits=4.0, lattice="E8", bias_correction=bias_correction,
                                   cache_text_kv=cache_text_kv)
    handle.reset()
    eager = run_tiny_pipeline(pipe)
    after_eager = handle.stats()
    handle.reset()
    counters.clear()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled = run_tiny_pipeline(pipe)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert np.abs(compiled - eager).max() < tol and compiled.std() > 0.01
    after_compiled = handle.stats()
    # the store's counters add up over runs: the compiled run computed and reused as many text K/V as the eager one
    for key in ("computed", "reused"):
        assert after_compiled[key] == 2 * after_eager[key]
    assert after_eager["reused"] > 0 if cache_text_kv else after_eager["computed"] == 0


@pytest.mark.parametrize("cache_text_kv", [False, True])
def test_whole_tiny_ltx2_transformer_compiled_with_kv_compression(tiny_ltx2_path, cache_text_kv):
    """``torch.compile`` of the whole transformer (the form ``reduce-overhead`` needs; here the default mode) with K/V
    compression. Without the text cache it is one graph (``fullgraph=True``); with it, the cache hook's host-side
    prompt comparison (``torch.equal``) is the only graph break, and ``fullgraph=True`` is refused with a reason that
    names the cache and what to compile instead. The text K/V are computed and reused as often as
    eagerly. The video is not bit-close to the eager one: Inductor rounds LTX-2's float64 RoPE frequencies to
    float32 differently (~1e-3 in a high-frequency band of K, harmless without K/V compression: 1e-6 at the output),
    which moves a few keys across a lattice cell boundary (rel. L2 1.3e-3 measured). So the bound is relative to
    what a seeding error would cost: another dither draw (seed 1) moves the video 25-30x as far (0.036)."""
    from diffusers import LTX2Pipeline, PipelineQuantizationConfig
    from torch._dynamo.utils import counters

    import hyperquant_diffusers  # noqa: F401  (registers the backend)
    from hyperquant_diffusers.kv import disable_kv_compression, enable_kv_compression
    from hyperquant_diffusers.testing import run_tiny_pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": 64},
        components_to_quantize=["transformer"]))
    kv = dict(kv_bits=4.0, lattice="E8", bias_correction="dither", cache_text_kv=cache_text_kv)
    enable_kv_compression(pipe.transformer, seed=1, **kv).reset()
    other_draw = run_tiny_pipeline(pipe)
    disable_kv_compression(pipe.transformer)
    handle = enable_kv_compression(pipe.transformer, **kv)
    handle.reset()
    eager = run_tiny_pipeline(pipe)
    after_eager = handle.stats()
    handle.reset()
    counters.clear()
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=not cache_text_kv)
    compiled = run_tiny_pipeline(pipe)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    breaks = list(counters["graph_break"])
    assert all("text-K/V cache identifies the prompt rows" in reason for reason in breaks)
    assert (len(breaks) > 0) == cache_text_kv
    assert rel(compiled, eager) < rel(other_draw, eager) / 8 and rel(other_draw, eager) > 0.01
    after_compiled = handle.stats()
    for key in ("computed", "reused"):
        assert after_compiled[key] == 2 * after_eager[key]
    if cache_text_kv:   # fullgraph=True: Dynamo refuses the hook's row identification, giving HyperQuant's reason
        torch._dynamo.reset()
        pipe.transformer = torch.compile(pipe.transformer._orig_mod, fullgraph=True)
        with pytest.raises(torch._dynamo.exc.Unsupported, match="text-K/V cache identifies the prompt rows"):
            run_tiny_pipeline(pipe)


def test_kv_ops_fake_shapes_and_named_errors():
    from hyperquant_diffusers.kv.processors import _KVCore
    from hyperquant_diffusers.kv.quantizer import KVQuantConfig

    core = _KVCore("self", 0, 16, KVQuantConfig(bits=4.0, lattice="E8", method="dither"))
    k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    qk, qv = torch.ops.hyperquant.kv_quantize(k, v, core.op_id)
    assert qk.shape == k.shape and qv.dtype == v.dtype and not torch.equal(qk, k)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fk, fv = torch.ops.hyperquant.kv_text(mode.from_tensor(torch.randn(2, 7, 64)), mode.from_tensor(core.op_id),
                                              32, 48)
    assert tuple(fk.shape) == (2, 7, 32) and tuple(fv.shape) == (2, 7, 48)
    with pytest.raises(RuntimeError, match="attention module is gone"):
        torch.ops.hyperquant.kv_text(torch.randn(2, 7, 64), core.op_id, 32, 32)
    # a deep copy is a core of its own: the op on the copy advances the copy's seed counter, not the original's
    twin = copy.deepcopy(core)
    assert int(twin.op_id) != int(core.op_id)
    calls = core.calls
    torch.ops.hyperquant.kv_quantize(k, v, twin.op_id)
    assert (core.calls, twin.calls) == (calls, calls + 1)
    plain = _KVCore("self", 1, 16, None)
    with pytest.raises(ValueError, match="quantizes nothing"):
        torch.ops.hyperquant.kv_quantize(k, v, plain.op_id)
    with pytest.raises(RuntimeError, match="no live K/V compression core has op_id"):
        torch.ops.hyperquant.kv_quantize(k, v, torch.tensor([10 ** 12]))
