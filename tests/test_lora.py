"""LoRA adapters (peft, through diffusers' ``load_lora_weights``) on HyperQuant-quantized layers.

``LatticeLinear`` is an ``nn.Linear`` subclass, so peft wraps it in its own ``lora.Linear``: the adapter runs in
float beside the quantized product, ``y = lattice(x) + scale * B(A(x))``. The references are independent of our
layer: (1) float64 ``x @ W_hat.T + b + scale * x @ A.T @ B.T`` from the dequantized weight; (2) the *float*
pipeline with every quantized weight replaced by its dequantized value, given the same LoRA through the same
diffusers call, on plain ``nn.Linear`` layers.
"""

import os
import warnings

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


def test_two_active_adapters_with_weights_match_float64():
    """Two adapters active at once with their own weights (``set_adapters`` semantics through peft's scales): the
    one-pass adds sum ``x W_hat^T + b + sum_a w_a s_a x A_a^T B_a^T`` (float64), in float32 and in bfloat16."""
    torch.manual_seed(5)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q = LatticeLinear.from_linear(nn.Linear(128, 96), bits=4.0, tile_size=TILE)
        model = nn.Sequential()
        model.add_module("proj", q)
        model = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"]), model,
                                             adapter_name="a")
        model = peft.inject_adapter_in_model(peft.LoraConfig(r=2 * RANK, lora_alpha=4, target_modules=["proj"]),
                                             model, adapter_name="b")
        wrapped = model.proj
        wrapped.set_adapter(["a", "b"])
        wrapped.set_scale("a", 0.5)
        wrapped.set_scale("b", 1.5)
        with torch.no_grad():
            for a in ("a", "b"):
                wrapped.lora_B[a].weight.normal_(0, 0.2)
        model.to(dtype)
        x = torch.randn(3, 11, 128).to(dtype)
        with torch.no_grad():
            y = model(x)
        xd = x.double()
        ref = xd @ q.dequantize(torch.float64).T + q.bias.double()
        for a, s in (("a", 0.5 * 8 / RANK), ("b", 1.5 * 4 / (2 * RANK))):
            ref = ref + s * (xd @ wrapped.lora_A[a].weight.double().T @ wrapped.lora_B[a].weight.double().T)
        assert y.dtype == dtype
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol, dtype


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


def _delta64(lora_file_sd, name, scale=1.0):
    """float64 ``scale * B @ A`` of layer ``name`` from the LoRA file's own tensors (alpha = rank: scaling 1)."""
    a = lora_file_sd[f"{name}.lora_A.weight"].double()
    b = lora_file_sd[f"{name}.lora_B.weight"].double()
    return scale * (b @ a)


def test_fuse_lora_requantizes_and_unfuse_restores_bit_exactly(lora_setup, tiny_ltx2_path, tmp_path):
    """``fuse_lora`` re-quantizes each adapted layer from its dequantized weight plus the adapter's delta: the new
    codes approximate ``W_hat + scale * B A`` (float64, from the LoRA file) as closely as the codec approximated
    the original float weight, the wrappers then run the quantized layer alone, and the frames stay near the
    unfused adapter's. ``unfuse_lora`` puts the original codes back bit for bit. ``unload_lora_weights`` after
    the fuse keeps the re-quantized layers, and that model saves and loads as an ordinary checkpoint."""
    from safetensors.torch import load_file

    from hyperquant_diffusers.codec import quantize

    pipe, adapted, lora_dir, base = lora_setup
    lora_sd = {k.removeprefix("transformer."): v for k, v in
               load_file(os.path.join(lora_dir, "pytorch_lora_weights.safetensors")).items()}
    float_tr = LTX2Pipeline.from_pretrained(tiny_ltx2_path).transformer
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    w_hat = {n: pipe.transformer.get_submodule(n).dequantize(torch.float64) for n in adapted}
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    wrapped = pipe.transformer.get_submodule(adapted[0])
    assert type(wrapped).__name__ == "LatticeLoraLinear" and isinstance(wrapped, peft.tuners.lora.Linear)
    with_lora = run_tiny_pipeline(pipe)

    pipe.fuse_lora()
    # per shape (the fuse re-quantizes same-shape layers as one group sharing the rate search, as loading does, so
    # single layers land above or below the rate): sums of squared errors and of stored bytes, against the codec on
    # each original float weight quantized alone with the same settings
    sums: dict = {}
    for n in adapted:
        m = pipe.transformer.get_submodule(n)
        assert m.merged and m.merged_adapters == ["style"]
        target = w_hat[n] + _delta64(lora_sd, n)
        w = float_tr.get_submodule(n).weight.detach()
        q0 = quantize(w, bits=4.0, lattice="E8", tile_size=TILE)
        s = sums.setdefault(tuple(w.shape), np.zeros(6))
        s += [float((m.base_layer.dequantize(torch.float64) - target).square().sum()), float(target.square().sum()),
              float((q0.dequantize(torch.float64) - w.double()).square().sum()), float(w.double().square().sum()),
              m.base_layer.stored_nbytes(), LatticeLinear.from_lattice_tensor(q0, None, bits=4.0).stored_nbytes()]
    for shape, (e, t, e0, t0, nb, nb0) in sums.items():
        err, err0, size = (e / t) ** 0.5, (e0 / t0) ** 0.5, nb / nb0
        assert err < 1.15 * err0 and size < 1.03, (shape, err, err0, size)   # as close, in as many bytes
    fused = run_tiny_pipeline(pipe)
    quant_err = np.abs(base - run_tiny_pipeline(LTX2Pipeline.from_pretrained(tiny_ltx2_path))).max()
    diff, effect = np.abs(fused - with_lora).max(), np.abs(with_lora - base).max()
    print(f"fuse_lora at 4 bps: max |fused - unfused| {diff:.3f}, LoRA effect {effect:.3f}, 4-bps error of the "
          f"base frames {quant_err:.3f}")
    assert diff < 0.5 * effect and diff < 3 * quant_err

    pipe.unfuse_lora()
    assert not any(getattr(m, "merged", False) for m in pipe.transformer.modules())
    after = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert np.array_equal(run_tiny_pipeline(pipe), with_lora)

    pipe.fuse_lora()
    assert np.array_equal(run_tiny_pipeline(pipe), fused)   # merging is deterministic
    pipe.unload_lora_weights()
    assert all(isinstance(pipe.transformer.get_submodule(n), LatticeLinear) for n in adapted)
    assert np.array_equal(run_tiny_pipeline(pipe), fused)
    out = str(tmp_path / "fused")
    pipe.transformer.save_pretrained(out)    # the layout follows the new word counts
    from diffusers import LTX2VideoTransformer3DModel

    reloaded = LTX2VideoTransformer3DModel.from_pretrained(out)
    for n in adapted:
        assert torch.equal(reloaded.get_submodule(n).dequantize(), pipe.transformer.get_submodule(n).dequantize())
    # leave the shared pipeline as the fixture made it
    for n in adapted:
        pipe.transformer.get_submodule(n).load_state_dict(
            {k.removeprefix(n + "."): v for k, v in before.items() if k.startswith(n + ".")})
    assert np.array_equal(run_tiny_pipeline(pipe), base)


def test_fusing_adapters_one_by_one_equals_fusing_them_together(lora_setup, tiny_ltx2_path, tmp_path):
    """A second ``fuse_lora`` re-quantizes from the original codes plus both deltas (no second rounding of the
    first): fusing "a" then "b" gives the codes of fusing both at once, bit for bit."""
    pipe, adapted, lora_dir, _ = lora_setup
    other = str(tmp_path / "other")
    LTX2Pipeline.save_lora_weights(other, transformer_lora_layers={
        k.removeprefix("transformer."): v for k, v in _random_lora(pipe.transformer, adapted, seed=5).items()})
    states = []
    for one_by_one in (True, False):
        p = _quantized_pipe(tiny_ltx2_path)
        p.load_lora_weights(lora_dir, adapter_name="a")
        p.load_lora_weights(other, adapter_name="b")
        p.set_adapters(["a", "b"])
        if one_by_one:
            p.fuse_lora(adapter_names=["a"])
            p.fuse_lora(adapter_names=["b"])
        else:
            p.fuse_lora(adapter_names=["a", "b"])
        assert p.transformer.get_submodule(adapted[0]).merged_adapters == ["a", "b"]
        states.append({k: v for k, v in p.transformer.state_dict().items() if "lora_" not in k})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[1])


def _adapted_stack(seed=3, shapes=((128, 64), (128, 64), (64, 128), (128, 64), (64, 128))):
    """nn.Sequential of LatticeLinear layers (in, out) with one random LoRA ("default", scaling 1) on each, and
    each layer's float64 target ``W_hat + B A``."""
    torch.manual_seed(seed)
    m = nn.Sequential()
    for i, (k, n) in enumerate(shapes):
        m.add_module(f"l{i}", LatticeLinear.from_linear(nn.Linear(k, n), bits=4.0, tile_size=TILE))
    w_hat = {name: lay.dequantize(torch.float64) for name, lay in m.named_children()}
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(w_hat)), m)
    targets = {}
    with torch.no_grad():
        for name in w_hat:
            wrapper = getattr(m, name)
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            a.normal_(0, 0.3), b.normal_(0, 0.3)
            targets[name] = w_hat[name] + b.double() @ a.double()
    return m, targets


def _codes(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}


def _spy_filled(monkeypatch) -> list:
    """Record each ``kernels.quantize.quantize_filled`` call (a batched merge's group) as the list of weights its
    ``fill`` wrote, cloned."""
    import hyperquant_diffusers.kernels.quantize as kq

    calls = []
    real = kq.quantize_filled

    def spy(shape, count, fill, **kw):
        got = []

        def recording_fill(i, out):
            fill(i, out)
            got.append(out.clone())

        res = real(shape, count, recording_fill, **kw)
        calls.append(got)
        return res

    monkeypatch.setattr(kq, "quantize_filled", spy)
    return calls


def test_batched_merges_stack_same_shape_layers_into_one_codec_call(monkeypatch):
    """Inside ``batched_merges`` the merges wait and are re-quantized per (shape, codec settings): one
    ``quantize_filled`` call per shape here, the weights it is given the layers' ``W_hat + B A`` (float64
    reference), in module order; the merged weights as close to their targets as a merge one layer at a time, per
    shape. With groups of one layer (``group_values=1``) every code equals the unbatched merge's, bit for bit."""
    from hyperquant_diffusers.nn.lora import batched_merges

    calls = _spy_filled(monkeypatch)
    m, targets = _adapted_stack()
    with torch.no_grad(), batched_merges():
        for name in targets:
            getattr(m, name).merge()
            assert not getattr(m, name).merged          # waits for its group
        assert not calls
    assert [len(c) for c in calls] == [3, 2]            # both groups at the block's end, in order of arrival
    by_shape = {(64, 128): ["l0", "l1", "l3"], (128, 64): ["l2", "l4"]}
    for c in calls:
        names = by_shape[tuple(c[0].shape)]
        for w, n in zip(c, names):
            assert float((w.double() - targets[n]).abs().max()) < 1e-5
    batched = _codes(m)
    errs = {n: _rel(getattr(m, n).base_layer.dequantize(torch.float64), targets[n]) for n in targets}
    assert all(getattr(m, n).merged and getattr(m, n).merged_adapters == ["default"] for n in targets)

    m2, _ = _adapted_stack()
    with torch.no_grad():
        for name in targets:
            getattr(m2, name).merge()                   # no batch: one codec call per layer
    single = _codes(m2)
    errs1 = {n: _rel(getattr(m2, n).base_layer.dequantize(torch.float64), targets[n]) for n in targets}
    for names in by_shape.values():
        e, e1 = (sum(d[n] ** 2 for n in names) ** 0.5 for d in (errs, errs1))
        assert e < 1.1 * e1
    m3, _ = _adapted_stack()
    with torch.no_grad(), batched_merges(group_values=1):
        for name in targets:
            getattr(m3, name).merge()
    ones = _codes(m3)
    assert all(torch.equal(ones[k], single[k]) for k in single)
    assert any(not torch.equal(batched[k], single[k]) for k in single)   # the shared rate search is in effect
    for name in targets:                                 # unmerge gives the original codes back
        getattr(m, name).unmerge()
    m0, _ = _adapted_stack()
    assert all(torch.equal(v, _codes(m0)[k]) for k, v in _codes(m).items())


def test_waiting_merges_hold_no_float_weight(monkeypatch):
    """A batched merge holds no float copy of its merged weight while it waits: when its group's codec call runs,
    the only float32 tensor of the group's values is the stacked buffer the merged weights were computed into. (A
    waiting ``W_hat + dW`` per layer plus their concatenation held ~5 GiB beside a full LTX-2 fuse; bench_lora
    ``gpu_gib_peak_during_fuse``.) A re-merge (the layer holds its first merge's codes) builds its weight from the
    original codes and leaves the layer's codes as they were until the group is quantized."""
    import gc

    import hyperquant_diffusers.kernels.quantize as kq
    from hyperquant_diffusers.nn.lora import batched_merges

    seen = []
    real = kq.quantize

    def spy(w, **kw):
        gc.collect()
        layer = [t for t in gc.get_objects() if type(t) in plain and t.dtype == torch.float32
                 and tuple(t.shape) == (64, 128) and ptr(t) not in before]
        seen.append((tuple(w.shape), len(layer)))
        return real(w, **kw)

    m, targets = _adapted_stack()
    plain = (torch.Tensor, nn.Parameter)     # not the fake tensors earlier compile tests may have left behind

    def ptr(t):
        try:
            return t.data_ptr()
        except RuntimeError:                 # no storage (sparse, ...): not a weight copy
            return None

    before = {ptr(t) for t in gc.get_objects() if type(t) in plain}
    monkeypatch.setattr(kq, "quantize", spy)
    with torch.no_grad(), batched_merges():
        for name in targets:
            getattr(m, name).merge()
    assert seen == [((192, 128), 0), ((256, 64), 0)]    # l0 l1 l3 stacked, then l2 l4; no (64, 128) copy alive
    first = _codes(m)
    twin, _ = _adapted_stack()                           # the same layers and adapters, merged one layer at a time
    with torch.no_grad():
        for name in targets:
            getattr(twin, name).merge()
    gen = torch.Generator().manual_seed(5)
    for name in targets:                                 # a second adapter, merged onto the first merge
        a, b = (torch.randn(getattr(m, name).lora_A["default"].weight.shape, generator=gen) * 0.3,
                torch.randn(getattr(m, name).lora_B["default"].weight.shape, generator=gen) * 0.3)
        targets[name] = targets[name] + b.double() @ a.double()
        for model in (m, twin):
            wrapper = getattr(model, name)
            wrapper.update_layer("second", RANK, RANK, config=peft.LoraConfig(r=RANK, lora_alpha=RANK))
            with torch.no_grad():
                wrapper.lora_A["second"].weight.copy_(a)
                wrapper.lora_B["second"].weight.copy_(b)
    seen.clear()
    with torch.no_grad(), batched_merges():
        for name in targets:
            getattr(m, name).merge(adapter_names=["second"])
            assert torch.equal(_codes(m)[f"{name}.base_layer.hq_words"], first[f"{name}.base_layer.hq_words"])
    assert seen == [((192, 128), 0), ((256, 64), 0)]
    with torch.no_grad():
        for name in targets:
            getattr(twin, name).merge(adapter_names=["second"])
    assert all(getattr(m, n).merged_adapters == ["default", "second"] for n in targets)
    # W_hat + dW_default + dW_second re-quantized: as close to it as the one-layer-at-a-time merges, per shape
    errs, errs1 = ({n: _rel(getattr(x, n).base_layer.dequantize(torch.float64), targets[n]) for n in targets}
                   for x in (m, twin))
    for names in (["l0", "l1", "l3"], ["l2", "l4"]):
        e, e1 = (sum(d[n] ** 2 for n in names) ** 0.5 for d in (errs, errs1))
        assert e < 1.1 * e1, (names, e, e1)


def test_batched_merges_drop_what_waits_when_the_block_raises():
    """A block that raises leaves the waiting layers unmerged with their original codes; a layer that merges again
    or unmerges inside the block first settles what waits."""
    from hyperquant_diffusers.nn.lora import batched_merges

    m, targets = _adapted_stack()
    before = _codes(m)
    with torch.no_grad(), pytest.raises(KeyError, match="boom"), batched_merges():
        for name in targets:
            getattr(m, name).merge()
        raise KeyError("boom")
    assert not any(getattr(m, n).merged for n in targets) and all(torch.equal(v, before[k])
                                                                   for k, v in _codes(m).items())
    with torch.no_grad(), batched_merges():
        m.l0.merge()
        m.l1.merge()
        m.l0.unmerge()                                   # settles l0 and l1 first, then unmerges l0
        assert m.l1.merged and not m.l0.merged
    assert all(torch.equal(_codes(m)[k], before[k]) for k in before if k.startswith("l0."))
    assert any(not torch.equal(_codes(m)[k], before[k]) for k in before if k.startswith("l1."))
    with pytest.raises(ValueError, match="group_values"):
        with batched_merges(group_values=0):
            pass
    # a broken (NaN) adapter is refused when it merges, before it waits; the block then drops what waits
    m, targets = _adapted_stack()
    before = _codes(m)
    with torch.no_grad():
        m.l3.lora_A["default"].weight[0, 0] = float("nan")
    tried = []
    with torch.no_grad(), pytest.raises(ValueError, match="NaN"), batched_merges():
        for name in targets:
            tried.append(name)
            getattr(m, name).merge()
    assert tried == ["l0", "l1", "l2", "l3"]             # raised by l3's own merge, not when its group ran
    assert not any(getattr(m, n).merged for n in targets) and all(torch.equal(v, before[k])
                                                                   for k, v in _codes(m).items())


def test_requantize_many_refuses_mixed_layers_by_name():
    a = LatticeLinear.from_linear(nn.Linear(128, 64), bits=4.0, tile_size=TILE)
    b = LatticeLinear.from_linear(nn.Linear(128, 64), bits=3.0, tile_size=TILE)
    w = torch.randn(64, 128)
    with pytest.raises(ValueError, match="requantize_key"):
        LatticeLinear.requantize_many([a, b], [w, w])
    with pytest.raises(ValueError, match="NaN"):
        LatticeLinear.requantize_many([a], [torch.full((64, 128), float("nan"))])
    with pytest.raises(ValueError, match="shape"):
        LatticeLinear.requantize_many([a], [torch.randn(64, 64)])
    with pytest.raises(ValueError, match="2 layers and 1 weights"):
        LatticeLinear.requantize_many([a, a], [w])


def test_quantized_diffusers_model_fuses_in_batches(lora_setup):
    """The backend makes a quantized model's own ``fuse_lora`` batched (``pipe.fuse_lora`` calls it), on that model
    object only; ``copy.deepcopy`` binds the copy's to the copy."""
    import copy

    from diffusers import LTX2VideoTransformer3DModel

    pipe = lora_setup[0]
    tr = pipe.transformer
    assert tr.fuse_lora.__func__.__name__ == "fuse_lora" and tr.fuse_lora.__self__ is tr
    assert "fuse_lora" in vars(tr) and "fuse_lora" not in vars(LTX2VideoTransformer3DModel.from_config(tr.config))
    twin = copy.deepcopy(tr)
    assert twin.fuse_lora.__self__ is twin
    # groups as large as when the model loaded (its config's quantize_batch_values), kept by the copy
    cfg = tr.config.quantization_config
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    assert vars(tr)["_hq_fuse_group_values"] == vars(twin)["_hq_fuse_group_values"] == cfg["quantize_batch_values"]


class _FusingStack(nn.Sequential):
    """A model whose ``fuse_lora`` merges every adapted layer, as diffusers' ``PeftAdapterMixin.fuse_lora`` does."""

    def fuse_lora(self):
        for mod in self:
            mod.merge()


def test_batch_fuse_lora_groups_as_many_values_as_asked(monkeypatch):
    """``batch_fuse_lora(model, group_values)``: the model's ``fuse_lora`` re-quantizes in groups of at most that
    many values (the backend passes ``quantize_batch_values``; 0 there means 1 here: one layer per call, the
    codes of an unbatched merge). A group size that is not a positive integer is refused by name."""
    from collections import OrderedDict

    from hyperquant_diffusers.nn.lora import batch_fuse_lora

    filled = _spy_filled(monkeypatch)
    calls = []
    codes = {}
    for group in (1 << 28, 2 * 64 * 128, 1):
        m, _ = _adapted_stack()
        m = _FusingStack(OrderedDict(m.named_children()))
        batch_fuse_lora(m, group_values=group)
        filled.clear()
        with torch.no_grad():
            m.fuse_lora()
        calls = [len(c) for c in filled]
        codes[group] = _codes(m)
        # shapes 64x128 (l0, l1, l3) and 128x64 (l2, l4): groups of at most group // 8192 layers
        assert sorted(calls) == {1 << 28: [2, 3], 2 * 64 * 128: [1, 2, 2], 1: [1, 1, 1, 1, 1]}[group]
    m2, _ = _adapted_stack()
    with torch.no_grad():
        for mod in m2.children():
            mod.merge()                                   # unbatched
    assert all(torch.equal(codes[1][k], v) for k, v in _codes(m2).items())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="group_values"):
            batch_fuse_lora(_FusingStack(), group_values=bad)


def test_lora_variant_on_a_quantized_layer_is_refused_by_name():
    """DoRA needs the dense base weight at every step: creating it on a LatticeLinear raises an error naming the
    variant (not peft's shape error on the 0-element placeholder weight)."""
    q = LatticeLinear.from_linear(nn.Linear(128, 64), bits=4.0, tile_size=TILE)
    m = nn.Sequential()
    m.add_module("proj", q)
    with pytest.raises(NotImplementedError, match="DoraLinearVariant.*64x128 LatticeLinear"):
        peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, use_dora=True, target_modules=["proj"]), m)


def test_lora_bias_runs_peft_forward_and_merges_into_the_bias():
    """An adapter with a LoRA bias takes peft's forward (float64 reference) and merges into the layer's float bias;
    unmerge puts the original bias back exactly."""
    torch.manual_seed(2)
    q = LatticeLinear.from_linear(nn.Linear(128, 64), bits=4.0, tile_size=TILE)
    bias0 = q.bias.detach().clone()
    m = nn.Sequential()
    m.add_module("proj", q)
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_bias=True,
                                                     target_modules=["proj"]), m)
    b_mod = m.proj.lora_B["default"]
    with torch.no_grad():
        b_mod.weight.normal_(0, 0.1)
        b_mod.bias.normal_(0, 0.5)
    x = torch.randn(4, 128)
    xd = x.double()
    with torch.no_grad():
        y = m(x)
        a = m.proj.lora_A["default"].weight.double()
        ref = xd @ q.dequantize(torch.float64).T + bias0.double() + xd @ a.T @ b_mod.weight.double().T \
            + b_mod.bias.double()
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
        m.proj.merge()
        assert torch.allclose(q.bias.double(), bias0.double() + b_mod.bias.double(), atol=1e-6)
        m.proj.unmerge()
    assert torch.equal(q.bias, bias0)
    # a merge that fails (a broken second adapter) leaves the first merge in place, bias and codes
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_bias=True,
                                                     target_modules=["proj"]), m, adapter_name="broken")
    with torch.no_grad():
        m.proj.merge(adapter_names=["default"])
        merged_state = {k: v.clone() for k, v in q.state_dict().items()}
        m.proj.lora_B["broken"].weight.fill_(float("nan"))
        with pytest.raises(ValueError, match="NaN"):
            m.proj.merge(adapter_names=["broken"])
    assert m.proj.merged_adapters == ["default"]
    assert all(torch.equal(v, merged_state[k]) for k, v in q.state_dict().items())
    assert not torch.equal(q.bias, bias0)


@pytest.mark.parametrize("rel, kept", [(0.02, False), (0.25, True)])
def test_fuse_measures_the_kept_delta_and_warns_when_it_rounds_away(rel, kept):
    """Re-quantizing ``W_hat + dW`` keeps only the part of ``dW`` the codec resolves at its rate: a delta far below
    the codec's error (2% of ``|W|`` against ~7.5% at 4 bps) rounds back to the original codes, and the merge
    warns (once per adapter set); a 25% delta is kept. The reported fraction equals ``<W_fused - W_hat, dW> /
    |dW|^2`` in float64 from the dequantized weights."""
    from hyperquant_diffusers.nn.lora import RETAINED_WARN, fused_lora_retained

    torch.manual_seed(3)
    lin = nn.Linear(512, 256)
    q = LatticeLinear.from_linear(lin, bits=4.0, tile_size=TILE)
    m = nn.Sequential()
    m.add_module("proj", q)
    name = f"delta{int(rel * 100)}"
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=16, target_modules=["proj"]), m,
                                     adapter_name=name)
    a_mod, b_mod = m.proj.lora_A[name], m.proj.lora_B[name]
    with torch.no_grad():
        a_mod.weight.normal_()
        b_mod.weight.normal_()
        b_mod.weight.mul_(rel * lin.weight.double().norm() / (b_mod.weight.double() @ a_mod.weight.double()).norm())
    delta = b_mod.weight.detach().double() @ a_mod.weight.detach().double()
    w_hat = q.dequantize(torch.float64)

    def merge():
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            m.proj.merge()
        return [str(w.message) for w in rec if "fuse_lora" in str(w.message)]

    warned = merge()
    ref = float(((q.dequantize(torch.float64) - w_hat) * delta).sum() / delta.square().sum())
    got = fused_lora_retained(m)
    print(f"kept {ref:.4f} of a {rel} delta")
    assert list(got) == ["proj"] and abs(got["proj"] - ref) < 1e-4, (got, ref)
    if kept:
        assert ref > 0.9 and not warned
    else:
        assert ref < 0.2 < RETAINED_WARN and len(warned) == 1, (ref, warned)
        assert f"kept {100 * ref:.0f}% of the weight change of adapter(s) ['{name}']" in warned[0]
    m.proj.unmerge()
    assert fused_lora_retained(m) == {}
    assert not merge()          # the same adapter set again: warned once already


def test_adapter_gradients_through_the_quantized_layer_match_float64():
    """Training an adapter on the quantized base (grad enabled): the adapter add is out of place, so autograd
    gives the float64 gradients of ``(x W_hat^T + b + s x A^T B^T)`` for A, B and x."""
    torch.manual_seed(1)
    q = LatticeLinear.from_linear(nn.Linear(128, 64), bits=4.0, tile_size=TILE)
    m = nn.Sequential()
    m.add_module("proj", q)
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"]), m)
    a_mod, b_mod = m.proj.lora_A["default"], m.proj.lora_B["default"]
    with torch.no_grad():
        b_mod.weight.normal_(0, 0.1)
    x = torch.randn(9, 128, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xd = x.detach().double().requires_grad_()
    ad, bd = (t.detach().double().requires_grad_() for t in (a_mod.weight, b_mod.weight))
    yd = xd @ q.dequantize(torch.float64).T + q.bias.double() + (8 / RANK) * (xd @ ad.T @ bd.T)
    (yd * g.double()).sum().backward()
    for got, ref in ((x.grad, xd.grad), (a_mod.weight.grad, ad.grad), (b_mod.weight.grad, bd.grad)):
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("mma,residency", [("int8", "int8"), ("fp8", "int8"), ("int8", "compressed")])
def test_gpu_merge_requantizes_on_the_device_and_unmerge_restores(mma, residency):
    """On CUDA: the fused adapter add matches float64; ``merge`` re-quantizes on the GPU (the merged weight as close
    to ``W_hat + B A`` as the codec's error on the original weight) and the merged layer runs the quantized kernels
    alone; ``unmerge`` gives back the original codes and the same output bit for bit."""
    from hyperquant_diffusers.codec import quantize

    torch.manual_seed(4)
    lin = nn.Linear(2048, 1024, device="cuda", dtype=torch.bfloat16)
    q = LatticeLinear.from_linear(lin, bits=4.0, mma=mma, residency=residency)
    model = nn.Sequential()
    model.add_module("proj", q)
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=16, target_modules=["proj"]), model)
    assert type(model.proj).__name__ == "LatticeLoraLinear"
    a, b = torch.randn(16, 2048) * 0.05, torch.randn(1024, 16) * 0.05
    with torch.no_grad():
        model.proj.lora_A["default"].weight.copy_(a)
        model.proj.lora_B["default"].weight.copy_(b)
    x = torch.randn(2, 300, 2048, device="cuda").to(torch.bfloat16)
    xd = x.double().cpu()
    w_hat = q.dequantize(torch.float64).cpu()
    target = w_hat + b.double() @ a.double()
    tol = 0.01 if mma == "int8" else 0.05
    with torch.no_grad():
        y = model(x)
        assert _rel(y.cpu(), xd @ target.T + q.bias.double().cpu()) < tol
        model.proj.merge()
        w_m = q.dequantize(torch.float64).cpu()
        assert q.codes is None if residency == "compressed" else q.codes.is_cuda
        w = lin.weight.double().cpu()
        err0 = _rel(quantize(lin.weight.detach(), bits=4.0).dequantize(torch.float64).cpu(), w)
        assert _rel(w_m, target) < 1.15 * err0
        y_m = model(x)
        assert _rel(y_m.cpu(), xd @ w_m.T + q.bias.double().cpu()) < tol
        model.proj.unmerge()
        assert torch.equal(q.dequantize(torch.float64).cpu(), w_hat)
        assert torch.equal(model(x), y)


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
