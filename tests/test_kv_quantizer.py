"""K/V quantizer: unbiased inner products (closed-form variances), rate accounting, storage round trip, errors."""

import math

import pytest
import torch

from hyperquant_diffusers.codec import coords_to_points, inverse_rht, nearest_point, rht
from hyperquant_diffusers.kv import KVQuantConfig, KVQuantizer, dither_error_variance, qjl_error_variance
from hyperquant_diffusers.kv.quantizer import decode_log8, encode_log8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _heavy(gen, *shape):
    """Non-Gaussian test vectors: Gaussian times a log-normal per-channel gain (a few strong channels)."""
    return torch.randn(*shape, generator=gen) * torch.exp(torch.randn(shape[-1], generator=gen))


def _step(quant: KVQuantizer, k: torch.Tensor) -> float:
    """The quantizer's per-vector step for ``k`` (D,), recomputed from the codec primitives."""
    y = rht(k[None].float(), quant.signs, quant.tile)
    return float(decode_log8(encode_log8(y.square().mean(1).sqrt() * quant.alpha)))


@pytest.mark.parametrize("lattice", ["E8", "D4", "A2", "Z"])
def test_dither_inner_products_unbiased_with_closed_form_variance(lattice):
    d, draws = 128, 4096
    gen = torch.Generator().manual_seed(1)
    k = _heavy(gen, d)
    quant = KVQuantizer(KVQuantConfig(bits=3.0, lattice=lattice, method="dither"), d, seed=3)
    # The adversarial query for plain rounding: the direction of its own error.
    k_none = KVQuantizer(KVQuantConfig(bits=3.0, lattice=lattice, method="none"), d, seed=3).fake_quantize(k, 0)
    err = (k_none - k).double()
    q = err / err.norm() * k.norm()
    truth = float(q @ k.double())
    # Every row of one call gets an independent dither draw.
    ips = quant.fake_quantize(k.expand(draws, d).contiguous(), call_seed=11).double() @ q
    var_th = float(q.square().sum()) * _step(quant, k) ** 2 * dither_error_variance(lattice)
    var_emp = float(ips.var())
    # sample variance of 4096 draws: relative std sqrt(2/4096) = 2.2 %
    assert abs(var_emp / var_th - 1) < 0.10, (var_emp, var_th)
    # error of the mean over N draws ~ sqrt(var/N): RMS over groups, N = 16 .. 256 (>= 16 groups each)
    for n in (16, 64, 256):
        g = ips.view(-1, n).mean(1) - truth
        ratio = float(g.square().mean().sqrt()) / math.sqrt(var_th / n)
        assert 0.6 < ratio < 1.4, (n, ratio)
    assert abs(float(ips.mean()) - truth) < 4 * math.sqrt(var_th / draws)
    # plain rounding is biased along its error: bias |e| |k|, far beyond the dithered mean's error
    bias_none = float(q @ k_none.double()) - truth
    assert abs(bias_none) > 10 * math.sqrt(var_th / draws)


def test_qjl_inner_products_unbiased_with_closed_form_variance():
    d, draws = 64, 900
    gen = torch.Generator().manual_seed(2)
    k = _heavy(gen, d)
    cfg = KVQuantConfig(bits=4.0, lattice="E8", method="qjl")
    quant = KVQuantizer(cfg, d, seed=5)
    assert quant.m == d
    # Residual of the deterministic part, recomputed with the codec's primitives (rotated domain).
    y = rht(k[None].float(), quant.signs, quant.tile)[0].double()
    s = _step(quant, k)
    y_q = coords_to_points("E8", nearest_point("E8", (y / s).float()[None]))[0].double() * s
    r = y - y_q
    q_rot = torch.randn(d, generator=gen, dtype=torch.float64)
    q_rot = q_rot + 3 * r / r.norm()  # a query correlated with the residual
    q = inverse_rht(q_rot[None].float(), quant.signs, quant.tile)[0].double()
    truth = float(q @ k.double())
    ips = torch.tensor([float(quant.fake_quantize(k[None], call_seed=i)[0].double() @ q) for i in range(draws)],
                       dtype=torch.float64)
    # the stored norm is rounded at random between neighbouring log codes a <= |r| <= b: E[n^2] in closed form
    rn = float(r.norm())
    lo = math.floor(math.log2(rn) * 8)
    a, b = 2 ** (lo / 8), 2 ** ((lo + 1) / 8)
    p = (rn - a) / (b - a)
    var_th = float(qjl_error_variance(q_rot, r, quant.m, norm_sq_mean=a * a * (1 - p) + b * b * p))
    var_emp = float(ips.var())
    assert abs(var_emp / var_th - 1) < 0.2, (var_emp, var_th)  # rel. std of the estimate ~ 5-6 %
    for n in (10, 30, 100):
        g = ips[: (draws // n) * n].view(-1, n).mean(1) - truth
        ratio = float(g.square().mean().sqrt()) / math.sqrt(var_th / n)
        assert 0.6 < ratio < 1.4, (n, ratio)
    assert abs(float(ips.mean()) - truth) < 4 * math.sqrt(var_th / draws)


def test_added_variance_per_method_and_none_is_deterministic():
    """Mean squared inner-product error over random queries at 4 bps, per method; 'none' has no randomness."""
    d, n_keys = 128, 256
    gen = torch.Generator().manual_seed(3)
    keys = _heavy(gen, n_keys, d)
    qs = torch.randn(64, d, generator=gen, dtype=torch.float64)
    truth = keys.double() @ qs.T
    mse = {}
    for method in ("dither", "qjl", "none"):
        quant = KVQuantizer(KVQuantConfig(bits=4.0, lattice="E8", method=method), d, seed=9)
        a = quant.fake_quantize(keys, 1).double() @ qs.T
        b = quant.fake_quantize(keys, 2).double() @ qs.T
        mse[method] = float((a - truth).square().mean())
        if method == "none":
            assert torch.equal(a, b)
        else:
            assert not torch.equal(a, b)
    # subtractive dither doubles nothing at high rate: its error power is that of rounding (same step, same cell)
    # within 25 %; QJL spends 1 bit per value on signs, so its base quantizer is coarser and its error larger.
    assert 0.75 < mse["dither"] / mse["none"] < 1.25, mse
    assert mse["qjl"] > mse["dither"], mse


@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0, 6.0])
def test_stored_size_counts_side_information(bits):
    gen = torch.Generator().manual_seed(4)
    # a slice of LTX-2's video text K: 256 tokens x 8 heads x head dim 128
    x = (_heavy(gen, 256, 8, 128) * torch.rand(256, 1, 1, generator=gen)).to(torch.bfloat16)
    quant = KVQuantizer(KVQuantConfig(bits=bits, lattice="E8", method="dither"), 128, seed=1)
    ck = quant.compress(x, call_seed=5)
    stored = ck.words.numel() * 4 + ck.offsets.numel() * 4 + ck.ks.numel() + ck.steps.numel() + 32
    assert ck.nbytes == stored
    # open-loop rate control (step calibrated once on Gaussian vectors): within 0.1 bit of the target
    assert abs(ck.bits_per_value - bits) < 0.1, ck.bits_per_value
    y = ck.dequantize()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(y, quant.fake_quantize(x, call_seed=5))
    if bits == 4.0:
        assert x.numel() * 2 / ck.nbytes >= 3.7
    # the "int8" cache format holds the same codes uncoded: same reconstruction, one byte (two past +-127) a value
    c8 = quant.compress(x, call_seed=5, fmt="int8")
    assert torch.equal(c8.dequantize(), y)
    assert c8.nbytes == c8.codes.numel() * c8.codes.element_size() + ck.steps.numel() + 32


def test_quality_rises_with_bits():
    gen = torch.Generator().manual_seed(6)
    x = _heavy(gen, 512, 64)
    snr = []
    for bits in (2.0, 3.0, 4.0, 6.0):
        quant = KVQuantizer(KVQuantConfig(bits=bits, lattice="E8", method="none"), 64, seed=1)
        e = quant.fake_quantize(x, 0) - x
        snr.append(10 * math.log10(float(x.square().sum() / e.square().sum())))
    assert all(b > a + 4.0 for a, b in zip(snr, snr[1:])), snr  # ~6 dB per bit at high rate


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="kv_bits must be in"):
        KVQuantConfig(bits=1.0)
    with pytest.raises(ValueError, match="unknown lattice"):
        KVQuantConfig(lattice="E7")
    with pytest.raises(ValueError, match="bias_correction must be one of"):
        KVQuantConfig(method="sign")
    with pytest.raises(ValueError, match="tile_size"):
        KVQuantizer(KVQuantConfig(), 24)
    with pytest.raises(ValueError, match="cannot reach"):
        KVQuantizer(KVQuantConfig(bits=1.5, lattice="E8"), 16)  # >= 1 Rice bit per value + an 8-bit step per 16 values
    with pytest.raises(ValueError, match="use more bits"):
        KVQuantizer(KVQuantConfig(bits=2.0, method="qjl"), 16)
    with pytest.raises(ValueError, match="cache format must be one of"):
        KVQuantizer(KVQuantConfig(), 64).compress(torch.randn(3, 64), 0, fmt="zip")
    with pytest.raises(ValueError, match="expected K/V vectors of 64"):
        KVQuantizer(KVQuantConfig(), 64).fake_quantize(torch.randn(3, 32), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("lattice", ["E8", "D4"])
def test_cuda_cache_decodes_with_triton_and_matches_torch_decoder(lattice):
    from hyperquant_diffusers.codec.stream import decode_coords
    from hyperquant_diffusers.kv.quantizer import BLOCK_VALUES, _gpu_decode

    x = torch.randn(2, 8, 300, 128, device="cuda")
    ck = KVQuantizer(KVQuantConfig(bits=4.0, lattice=lattice, method="dither"), 128, seed=1).compress(x, call_seed=5)
    fast = _gpu_decode(ck, lattice)
    assert fast is not None
    ref = decode_coords(ck.words, ck.offsets.to(torch.int64), ck.ks, ck.numel, lattice, BLOCK_VALUES)
    assert torch.equal(fast, ref)
