"""LoRA adapters (peft, through diffusers' ``load_lora_weights``) on HyperQuant-quantized layers.

``LatticeLinear`` is an ``nn.Linear`` subclass, so peft wraps it in its own ``lora.Linear``: the adapter runs in
float beside the quantized product, ``y = lattice(x) + scale * B(A(x))``. The references are independent of our
layer: (1) float64 ``x @ W_hat.T + b + scale * x @ A.T @ B.T`` from the dequantized weight; (2) the *float*
pipeline with every quantized weight replaced by its dequantized value, given the same LoRA through the same
diffusers call, on plain ``nn.Linear`` layers.
"""

import os

import numpy as np
import peft
import pytest
import torch
from diffusers import LTX2Pipeline, PipelineQuantizationConfig
from torch import nn

import hyperquant_diffusers  # noqa: F401  (registers the backend)
from hyperquant_diffusers import AdaptersLoadedError, LatticeLinear
from hyperquant_diffusers.testing import run_tiny_pipeline

TILE = 64
RANK = 4
N_ADAPTED = 10     # quantized layers the test LoRA targets (attention and feed-forward of both blocks)
#: frames of the quantized pipeline + LoRA against the dequantized float pipeline + the same LoRA (both float32 on
#: the CPU; they differ by float32 rounding of two orders of summation). Measured max |diff| 7.8e-7.
FRAMES_ATOL = 1e-4
#: the LoRA must move the frames far more than that, or the comparison proves nothing (measured 0.30)
LORA_EFFECT_MIN = 0.05


def _quantized_pipe(path):
    return LTX2Pipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": TILE},
        components_to_quantize=["transformer"]))


def _random_lora(model, names, seed=1, std=0.3):
    """A peft-format LoRA state dict (diffusers' ``transformer.`` prefix) for the named linears."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        m = model.get_submodule(n)
        sd[f"transformer.{n}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * std
        sd[f"transformer.{n}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * std
    return sd


@pytest.fixture(scope="module")
def lora_setup(tiny_ltx2_path, tmp_path_factory):
    pipe = _quantized_pipe(tiny_ltx2_path)
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, LatticeLinear)]
    adapted = [n for n in names if ".ff." in n or ".attn1." in n or ".attn2." in n][:N_ADAPTED]
    assert len(adapted) == N_ADAPTED
    lora_dir = str(tmp_path_factory.mktemp("lora"))
    LTX2Pipeline.save_lora_weights(lora_dir, transformer_lora_layers={
        k.removeprefix("transformer."): v for k, v in _random_lora(pipe.transformer, adapted).items()})
    base = run_tiny_pipeline(pipe)
    return pipe, adapted, lora_dir, base


def test_adapter_on_a_lattice_linear_matches_float64(tiny_ltx2_path):
    """One layer through peft: the adapted output is the quantized layer's plus ``scale * B A x``, in float64."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    q = LatticeLinear.from_linear(lin, bits=4.0, tile_size=TILE)
    model = nn.Sequential()
    model.add_module("proj", q)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"])
    model = peft.inject_adapter_in_model(cfg, model)
    wrapped = model.proj
    assert isinstance(wrapped, peft.tuners.lora.Linear) and wrapped.base_layer is q
    a = torch.randn(RANK, 128) * 0.2
    b = torch.randn(96, RANK) * 0.2
    with torch.no_grad():
        wrapped.lora_A["default"].weight.copy_(a)
        wrapped.lora_B["default"].weight.copy_(b)
    x = torch.randn(5, 7, 128)
    with torch.no_grad():
        y = model(x)
    xd = x.double()
    ref = xd @ q.dequantize(torch.float64).T + q.bias.double() + (8 / RANK) * (xd @ a.double().T @ b.double().T)
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < 1e-5, err
    lora_only = (8 / RANK) * (xd @ a.double().T @ b.double().T)
    assert lora_only.abs().max() > 0.1 * ref.abs().max()  # the adapter is a large part of the output


def test_load_lora_weights_on_quantized_ltx2_matches_dense_reference(lora_setup, tiny_ltx2_path):
    """``pipe.load_lora_weights`` on the 4-bps pipeline = the same LoRA on the float pipeline whose weights are the
    dequantized ones; ``set_adapters`` weights, ``disable_lora`` and ``unload_lora_weights`` behave as on float."""
    pipe, adapted, lora_dir, base = lora_setup
    dense = LTX2Pipeline.from_pretrained(tiny_ltx2_path)
    with torch.no_grad():
        for n, m in pipe.transformer.named_modules():
            if isinstance(m, LatticeLinear):
                dense.transformer.get_submodule(n).weight.copy_(m.dequantize(torch.float32))
    assert np.abs(run_tiny_pipeline(dense) - base).max() < FRAMES_ATOL  # the reference is the quantized model

    for p in (pipe, dense):
        p.load_lora_weights(lora_dir, adapter_name="style")
    wrapped = pipe.transformer.get_submodule(adapted[0])
    assert isinstance(wrapped, peft.tuners.lora.Linear) and isinstance(wrapped.base_layer, LatticeLinear)
    assert sum(isinstance(m, peft.tuners.lora.Linear) for m in pipe.transformer.modules()) == N_ADAPTED
    q_lora, d_lora = run_tiny_pipeline(pipe), run_tiny_pipeline(dense)
    diff = np.abs(q_lora - d_lora).max()
    effect = np.abs(q_lora - base).max()
    print(f"LoRA on 4 bps: max |quantized - dense reference| {diff:.2e}, LoRA effect {effect:.3f}")
    assert diff < FRAMES_ATOL and effect > LORA_EFFECT_MIN

    for p in (pipe, dense):
        p.set_adapters(["style"], adapter_weights=[0.5])
    q_half = run_tiny_pipeline(pipe)
    assert np.abs(q_half - run_tiny_pipeline(dense)).max() < FRAMES_ATOL
    assert np.abs(q_half - q_lora).max() > LORA_EFFECT_MIN / 4

    pipe.disable_lora()
    assert np.array_equal(run_tiny_pipeline(pipe), base)
    pipe.enable_lora()
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    assert np.array_equal(run_tiny_pipeline(pipe), q_lora)

    pipe.unload_lora_weights()
    assert all(isinstance(pipe.transformer.get_submodule(n), LatticeLinear) for n in adapted)
    assert np.array_equal(run_tiny_pipeline(pipe), base)


def test_save_with_lora_loaded_is_refused_before_writing(lora_setup, tmp_path):
    """A HyperQuant checkpoint holds the quantized weights only: saving with adapters attached (or with the empty
    wrappers ``delete_adapters`` leaves) raises a named error and writes nothing; after ``unload_lora_weights`` the
    save works."""
    pipe, adapted, lora_dir, base = lora_setup
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    out = str(tmp_path / "q")
    with pytest.raises(AdaptersLoadedError, match="unload_lora_weights") as e:
        pipe.transformer.save_pretrained(out)
    assert adapted[0] in str(e.value)
    assert not os.path.exists(out)
    pipe.delete_adapters("style")   # the adapter goes (the base video is back), peft's wrappers stay: still refused
    assert np.array_equal(run_tiny_pipeline(pipe), base)
    with pytest.raises(AdaptersLoadedError, match="delete_adapters leaves the wrappers"):
        pipe.transformer.save_pretrained(out)
    assert not os.path.exists(out)
    pipe.unload_lora_weights()
    pipe.transformer.save_pretrained(out)
    assert os.path.exists(os.path.join(out, "diffusion_pytorch_model.safetensors"))


def test_fuse_lora_into_lattice_codes_fails_and_leaves_the_adapter(lora_setup):
    """The codes cannot absorb a float delta: peft's merge fails on the layer's 0-element placeholder weight (it
    never holds a float copy), before anything is marked merged, and the pipeline still runs base + adapter."""
    pipe, _, lora_dir, _ = lora_setup
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    with_lora = run_tiny_pipeline(pipe)
    with pytest.raises(RuntimeError):
        pipe.fuse_lora()
    assert not any(getattr(m, "merged", False) for m in pipe.transformer.modules())
    assert np.array_equal(run_tiny_pipeline(pipe), with_lora)
    pipe.unload_lora_weights()


def _quantized_gemma(tiny_ltx2_path):
    from transformers import Gemma3ForConditionalGeneration

    from hyperquant_diffusers import HyperQuantConfig

    te = Gemma3ForConditionalGeneration.from_pretrained(
        os.path.join(tiny_ltx2_path, "text_encoder"),
        quantization_config=HyperQuantConfig(bits=4.0, lattice="E8", tile_size=TILE))
    names = [n for n, m in te.named_modules() if isinstance(m, LatticeLinear)]
    assert names
    return te, names


def test_text_encoder_save_with_injected_adapter_is_refused(tiny_ltx2_path, tmp_path):
    """The transformers side: a quantized Gemma 3 with a peft adapter injected refuses ``save_pretrained``."""
    te, names = _quantized_gemma(tiny_ltx2_path)
    te = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, target_modules=[names[0]]), te)
    with pytest.raises(AdaptersLoadedError, match=names[0].replace(".", r"\.")):
        te.save_pretrained(str(tmp_path / "te"))
    assert not os.path.exists(tmp_path / "te")


def test_ltx_video_pipeline_lora_matches_dense_reference(tiny_ltx_path):
    """``LTXPipeline`` (LTX-Video) too: the LoRA on its quantized transformer = the LoRA on the dequantized float
    pipeline, and it changes the video."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(tiny_ltx_path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": TILE},
        components_to_quantize=["transformer"]))
    dense = LTXPipeline.from_pretrained(tiny_ltx_path)
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, LatticeLinear)]
    assert len(names) >= 4
    with torch.no_grad():
        for n in names:
            dense.transformer.get_submodule(n).weight.copy_(pipe.transformer.get_submodule(n).dequantize(torch.float32))
    base = run_tiny_pipeline(pipe)
    sd = _random_lora(pipe.transformer, names[:6])
    for p in (pipe, dense):
        p.load_lora_weights(dict(sd), adapter_name="style")
    q_lora = run_tiny_pipeline(pipe)
    diff, effect = np.abs(q_lora - run_tiny_pipeline(dense)).max(), np.abs(q_lora - base).max()
    print(f"LTX-Video LoRA on 4 bps: max |quantized - dense reference| {diff:.2e}, LoRA effect {effect:.3f}")
    assert diff < FRAMES_ATOL and effect > LORA_EFFECT_MIN


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("mma", ["int8", "fp8"])
def test_gpu_adapter_beside_the_tensor_core_path(mma):
    """On CUDA the wrapped layer runs the int8/fp8 kernels plus the bf16 adapter, eager and under torch.compile
    (the layer is one opaque op, the adapter ordinary graph code): within the kernels' own error of float64."""
    torch.manual_seed(3)
    lin = nn.Linear(2048, 1024, device="cuda", dtype=torch.bfloat16)
    q = LatticeLinear.from_linear(lin, bits=4.0, mma=mma)
    model = nn.Sequential()
    model.add_module("proj", q)
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=16, target_modules=["proj"]), model)
    a, b = torch.randn(16, 2048) * 0.05, torch.randn(1024, 16) * 0.05
    with torch.no_grad():
        model.proj.lora_A["default"].weight.copy_(a)
        model.proj.lora_B["default"].weight.copy_(b)
    assert model.proj.lora_A["default"].weight.dtype == torch.bfloat16  # peft follows the placeholder's dtype
    x = torch.randn(2, 300, 2048, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        yc = torch.compile(model)(x)
    xd = x.double().cpu()
    ref = q.reference_forward(x.float()).double().cpu() + xd @ a.double().T @ b.double().T
    assert (xd @ a.double().T @ b.double().T).norm() > 0.2 * ref.norm()
    # as test_kernels' LatticeLinear forward: activation quantization (H200: int8 7.1e-3, fp8 2.5e-2 measured)
    tol = 0.01 if mma == "int8" else 0.05
    assert _rel(y.cpu(), ref) < tol and _rel(yc.cpu(), ref) < tol
    assert _rel(yc, y) < 1e-2


def _kv_pipe(path, cache_text_kv=True):
    return LTX2Pipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(
        quant_backend="hyperquant", components_to_quantize=["transformer"],
        quant_kwargs={"bits": 4.0, "lattice": "E8", "tile_size": TILE, "kv_bits": 4.0, "cache_text_kv": cache_text_kv,
                      "kv_bias_correction": "none"}))   # no dither: no per-call seeds, only the cache carries state


def test_lora_weights_changed_between_generations_reach_the_text_kv_cache(tiny_ltx2_path):
    """With ``kv_bits`` and the text-K/V cache on, an adapter on the cross-attention K/V projections: changing its
    weight between two generations gives exactly the video of a fresh pipeline at that weight (the cache holds
    nothing over from the previous generation's projections)."""
    def load():
        return _kv_pipe(tiny_ltx2_path)

    pipe = load()
    names = [n for n, m in pipe.transformer.named_modules()
             if isinstance(m, LatticeLinear) and (".attn2.to_k" in n or ".attn2.to_v" in n)]
    assert len(names) == 4  # two blocks' video cross-attention K and V
    sd = _random_lora(pipe.transformer, names)
    pipe.load_lora_weights(dict(sd), adapter_name="style")
    full = run_tiny_pipeline(pipe)
    pipe.set_adapters(["style"], adapter_weights=[0.25])
    quarter = run_tiny_pipeline(pipe)
    fresh = load()
    fresh.load_lora_weights(dict(sd), adapter_name="style")
    fresh.set_adapters(["style"], adapter_weights=[0.25])
    assert np.array_equal(quarter, run_tiny_pipeline(fresh))
    assert np.abs(full - quarter).max() > LORA_EFFECT_MIN / 4


def test_lora_scale_changed_mid_generation_reaches_the_text_kv_cache(tiny_ltx2_path):
    """A step callback that re-weights the adapter on the cross-attention K/V after the first step: with the text
    cache the video equals, bit for bit, that of the same pipeline without the cache (which projects the text K/V
    at every step), and differs from a run that keeps the first weight."""
    def run(pipe, switch):
        def callback(p, i, t, kwargs):
            if switch and i == 0:
                p.set_adapters(["style"], adapter_weights=[0.25])
            return kwargs
        pipe.set_adapters(["style"], adapter_weights=[1.0])
        return run_tiny_pipeline(pipe, callback_on_step_end=callback)

    pipes = {c: _kv_pipe(tiny_ltx2_path, cache_text_kv=c) for c in (True, False)}
    names = [n for n, m in pipes[True].transformer.named_modules()
             if isinstance(m, LatticeLinear) and (".attn2.to_k" in n or ".attn2.to_v" in n)]
    sd = _random_lora(pipes[True].transformer, names)
    for p in pipes.values():
        p.load_lora_weights(dict(sd), adapter_name="style")
    cached, uncached = run(pipes[True], True), run(pipes[False], True)
    assert np.array_equal(cached, uncached)
    assert np.abs(cached - run(pipes[True], False)).max() > LORA_EFFECT_MIN / 10


@pytest.mark.usefixtures("fresh_dynamo")
def test_lora_under_compile_repeated_blocks_matches_eager(lora_setup):
    """``compile_repeated_blocks(fullgraph=True)`` with the adapters attached: no graph break (the quantized layer
    is one op, peft's branch ordinary graph code), and the video equals the eager one to float32 rounding
    (measured 8.3e-7). Blocks with and without adapters compile to different graphs."""
    from torch._dynamo.utils import counters

    pipe, _, lora_dir, base = lora_setup
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    eager = run_tiny_pipeline(pipe)
    counters.clear()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    try:
        compiled = run_tiny_pipeline(pipe)
    finally:
        for block in pipe.transformer.transformer_blocks:   # back to eager for the module's other tests
            block._compiled_call_impl = None
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert np.abs(compiled - eager).max() < FRAMES_ATOL and np.abs(compiled - base).max() > LORA_EFFECT_MIN
    pipe.unload_lora_weights()
