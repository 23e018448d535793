"""LatticeLinear storage: the fp8 MMA's resident form (e4m3 codes + the exact values of the codes e4m3 rounds)."""

import pytest
import torch

from hyperquant_diffusers.nn import LatticeLinear, memory_footprint

E4M3 = torch.float8_e4m3fn


def _e4m3_integers() -> set:
    # every finite value an e4m3 byte can hold, from its 256 bit patterns: the independent reference for which
    # int8 codes e4m3 holds exactly
    vals = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(E4M3).to(torch.float32)
    return {int(v) for v in vals.tolist() if v == v and float(v).is_integer()}


@pytest.fixture(scope="module")
def layers():
    torch.manual_seed(21)
    lin = torch.nn.Linear(512, 96)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    a = LatticeLinear.from_linear(lin, bits=5.0, lattice="E8", mma="int8", residency="int8")
    b = LatticeLinear.from_linear(lin, bits=5.0, lattice="E8", mma="fp8", residency="int8")
    return lin, a, b


def test_fp8_residency_holds_e4m3_codes_and_exact_values_of_rounded_codes(layers):
    _, a, b = layers
    assert a.codes.dtype == torch.int8 and b.codes.dtype == E4M3
    exact = _e4m3_integers()
    c = a.codes.reshape(-1)
    inexact = torch.tensor([int(v) not in exact for v in c.tolist()])
    assert 0 < int(inexact.sum()) < c.numel()  # 5 bps E8 has codes above 16 (the test must exercise both kinds)
    assert torch.equal(b.code_fix_idx.long(), inexact.nonzero().reshape(-1))
    assert torch.equal(b.code_fix_val, c[inexact])
    # the resident e4m3 byte is the round-to-nearest-even cast of the code (what the fp8 MMA multiplies)
    assert torch.equal(b.codes.view(torch.uint8), a.codes.to(E4M3).view(torch.uint8))
    assert torch.equal(b.exact_codes(), a.codes)
    assert torch.equal(b.int8_weight()[0], a.codes)
    # one byte per weight on the device either way; the exact values of rounded codes live in host memory
    assert b.resident_nbytes() == a.resident_nbytes()
    assert b.code_fix_idx.device.type == "cpu" and b.code_fix_val.device.type == "cpu"
    assert "codes=e4m3" in repr(b)
    # the host-side table is counted apart: int32 index + int8 value per rounded code
    n_fix = int(inexact.sum())
    assert b.host_nbytes() == 5 * n_fix and a.host_nbytes() == 0
    fa, fb = memory_footprint(torch.nn.Sequential(a)), memory_footprint(torch.nn.Sequential(b))
    assert fb["lattice_host_bytes"] == 5 * n_fix and fa["lattice_host_bytes"] == 0
    assert fb["lattice_bytes"] == fa["lattice_bytes"] == a.resident_nbytes()


def test_fp8_residency_saves_and_computes_exactly(layers):
    _, a, b = layers
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(7, 512)
    assert torch.equal(b.reference_forward(x), a.reference_forward(x))
    assert torch.equal(b.rotated_weight(), a.rotated_weight())
    # a checkpoint loaded into an fp8 layer comes back in the e4m3 form
    c = LatticeLinear(512, 96, lattice="E8", bits=5.0, mma="fp8", residency="int8",
                      n_words=int(sa["hq_words"].numel()))
    c.load_state_dict(sa)
    c.finalize()
    assert c.codes.dtype == E4M3 and torch.equal(c.exact_codes(), a.codes)


def test_setting_mma_converts_the_resident_codes(layers):
    lin, a, _ = layers
    m = LatticeLinear.from_linear(lin, bits=5.0, lattice="E8", mma="int8", residency="int8")
    m.mma = "fp8"
    assert m.codes.dtype == E4M3 and torch.equal(m.exact_codes(), a.codes)
    m.mma = "int8"
    assert m.codes.dtype == torch.int8 and torch.equal(m.codes, a.codes)
    assert m.code_fix_idx is None and m.code_fix_val is None
    assert m.resident_nbytes() == a.resident_nbytes()
    # compressed residency holds no codes: nothing to convert
    comp = LatticeLinear.from_linear(lin, bits=5.0, lattice="E8", mma="int8", residency="compressed")
    comp.mma = "fp8"
    assert comp.codes is None and comp.hq_words is not None


def test_fp8_residency_is_one_device_byte_per_weight_at_4_bps():
    torch.manual_seed(22)
    lin = torch.nn.Linear(1024, 256)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    m = LatticeLinear.from_linear(lin, bits=4.0, lattice="E8", mma="fp8", residency="int8")
    frac = m.code_fix_idx.numel() / m.codes.numel()
    # 4 bps E8 codes (stored doubled) reach past 16 in the Gaussian tails only: ~1.6% of them on 16.7M weights
    assert 0.001 < frac < 0.05
    code_bytes = m.resident_nbytes() - m.code_scale.numel() * 4 - m.signs_f32.numel() * 4
    assert code_bytes == m.codes.numel()


def test_bad_mma_or_residency_is_named(layers):
    _, a, _ = layers
    with pytest.raises(ValueError, match="mma must be one of"):
        a.mma = "fp16"
    assert a.mma == "int8" and a.codes.dtype == torch.int8
    with pytest.raises(ValueError, match="residency must be one of"):
        LatticeLinear(256, 64, residency="fp8")
    with pytest.raises(ValueError, match="mma must be one of"):
        LatticeLinear(256, 64, mma="bf16")


@pytest.mark.parametrize("mma", ["int8", "fp8"])
@pytest.mark.parametrize("cast", ["to_bf16", "half", "double"])
def test_dtype_casts_keep_the_quantized_state(layers, mma, cast):
    # a model-wide dtype cast must not round the float32 scales or convert the codes (a silent weight change)
    lin, a, _ = layers
    m = LatticeLinear.from_linear(lin, bits=5.0, lattice="E8", mma=mma, residency="int8")
    before = {n: getattr(m, n).clone() for n in ("codes", "code_scale", "signs_f32")}
    rot = m.rotated_weight()
    {"to_bf16": lambda: m.to(torch.bfloat16), "half": m.half, "double": m.double}[cast]()
    for n, t in before.items():
        assert getattr(m, n).dtype == t.dtype and torch.equal(getattr(m, n).view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(m.rotated_weight(), rot)
    assert m.bias.dtype != torch.float32  # ordinary parameters still follow the cast
    x = torch.randn(3, 512, dtype=m.bias.dtype)
    assert m(x).dtype == m.bias.dtype


@pytest.mark.parametrize("residency", ["int8", "compressed"])
def test_load_state_dict_of_another_stream_replaces_the_weight(residency):
    """``load_state_dict`` of another layer's state -- other weights, another rate, so a stream of another length
    -- makes this layer that weight in its own residency, and :meth:`requantize` followed by loading the original
    state gives the original back bit for bit. A state from another RHT seed is loaded with its own signs (the
    derived float signs follow); re-quantizing such a layer is refused by name."""
    torch.manual_seed(22)
    lin_a, lin_b = torch.nn.Linear(256, 64), torch.nn.Linear(256, 64)
    a = LatticeLinear.from_linear(lin_a, bits=4.0, tile_size=64, residency=residency)
    b = LatticeLinear.from_linear(lin_b, bits=3.0, tile_size=64, residency="compressed")
    original = {k: v.clone() for k, v in a.state_dict().items()}
    w_a = a.dequantize(torch.float64)
    assert b.n_words != a.n_words
    a.load_state_dict(b.state_dict())
    assert a.residency == residency and a.n_words == b.n_words
    assert torch.equal(a.dequantize(torch.float64), b.dequantize(torch.float64))
    assert torch.equal(a.signs, b.signs)
    x = torch.randn(5, 256)
    assert torch.equal(a(x), b(x))
    a.requantize(lin_b.weight.detach() * 3)
    assert a.residency == residency and a.rht_sign_mode() == "tiled"
    w3 = lin_b.weight.detach().double() * 3
    assert float((a.dequantize(torch.float64) - w3).norm() / w3.norm()) < 0.15   # 4 bps E8 at tile 64: ~0.13
    a.load_state_dict(original)
    assert torch.equal(a.dequantize(torch.float64), w_a)
    assert all(torch.equal(v, original[k]) for k, v in a.state_dict().items())
    c = LatticeLinear.from_linear(lin_b, bits=4.0, tile_size=64, seed=7, residency="compressed")
    a.load_state_dict(c.state_dict())
    assert torch.equal(a.signs, c.signs) and not torch.equal(a.signs, b.signs)
    assert torch.equal(a(x), c(x))
    with pytest.raises(RuntimeError, match="not those seed 0 draws"):
        a.requantize(lin_a.weight.detach())
