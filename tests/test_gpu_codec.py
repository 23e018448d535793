"""The codec on CUDA tensors (the same torch code as the CPU reference) against the CPU path, which runs the numba
kernels when they are installed: same Rice streams for the same coordinates, same nearest points, and quantize on
the GPU lands on its rate and SNR. Runs on the device machine (``-m gpu``); skipped without CUDA."""

import pytest
import torch

from hyperquant_diffusers.codec import quantize
from hyperquant_diffusers.codec.lattices import nearest_point
from hyperquant_diffusers.codec.stream import decode_coords, encode_coords

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_DIM = {"E8": 8, "D4": 4, "Z": 1, "A2": 2}


@pytest.mark.parametrize("lattice", ["E8", "D4", "Z", "A2"])
def test_gpu_encode_and_nearest_point_equal_cpu(lattice):
    torch.manual_seed(0)
    x = torch.randn(1 << 18) * 3.0
    x[7] = 5000.0                                    # an escape
    x[100:108] = 0.5                                 # ties
    xs = x.reshape(-1, _DIM[lattice])
    c_cpu = nearest_point(lattice, xs).reshape(-1)
    c_gpu = nearest_point(lattice, xs.cuda()).reshape(-1)
    assert torch.equal(c_cpu, c_gpu.cpu())
    a = encode_coords(c_cpu, lattice, 4096)
    b = encode_coords(c_cpu.cuda(), lattice, 4096)
    for u, v in zip(a, b):
        assert torch.equal(u, v.cpu())
    back = decode_coords(*[t.cuda() for t in b], c_cpu.numel(), lattice, 4096)
    assert torch.equal(back.cpu(), c_cpu.to(torch.int32))


@pytest.mark.parametrize("lattice", ["E8", "D4", "Z", "A2"])
def test_gpu_quantize_meets_rate_and_matches_cpu_quality(lattice):
    torch.manual_seed(1)
    w = torch.randn(512, 1024)
    qc = quantize(w, bits=4.0, lattice=lattice)
    qg = quantize(w.cuda(), bits=4.0, lattice=lattice)
    assert qg.bits_per_scalar <= 4.0 + 1e-9 and abs(qg.bits_per_scalar - qc.bits_per_scalar) < 0.01

    def snr(q):
        wh = q.dequantize().float().cpu()
        return float(10 * torch.log10(w.square().sum() / (w - wh).square().sum()))

    assert abs(snr(qg) - snr(qc)) < 0.05
    # the blob decodes the same on either device
    qb = type(qg).from_bytes(qg.to_bytes())
    assert torch.equal(qb.decode_coords(), qg.decode_coords().cpu())
