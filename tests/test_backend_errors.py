"""Every bad config and bad checkpoint gets its named error; LatticeLinear's reference math vs float64."""

import json
import os
import shutil

import pytest
import torch
from torch import nn

import hyperquant_diffusers  # noqa: F401
from diffusers import LTXVideoTransformer3DModel
from hyperquant_diffusers import (CheckpointShapeError, HyperQuantConfig, HyperQuantConfigError, LatticeLinear,
                                  TruncatedCheckpointError, UnquantizableModuleError, UnsupportedFormatVersionError)
from hyperquant_diffusers.codec import inverse_rht, quantize
from hyperquant_diffusers.quantizers.core import CheckpointFormatError

ST = "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("kwargs, needle", [
    ({"lattice": "E7"}, "unknown lattice"),
    ({"bits": 0.5}, "bits must be in [1.0, 8.0]"),
    ({"bits": 9}, "bits must be in [1.0, 8.0]"),
    ({"bits": 1.1, "lattice": "E8"}, "bits=1.1 is below what E8 can reach: its Rice-coded coordinates cost 1.125"),
    ({"bits": float("nan")}, "bits must be in"),
    ({"tile_size": 96}, "tile_size must be a power of two"),
    ({"tile_size": 8}, "tile_size must be a power of two"),
    ({"mma": "int4"}, "unknown mma"),
    ({"residency": "gpu"}, "unknown residency"),
    ({"lattice": "A2", "residency": "int8"}, "residency='int8' needs integer lattice"),
    ({"kv_bits": 1.0}, "kv_bits must be in [1.5, 8.0]"),
    ({"kv_lattice": "E9"}, "unknown kv_lattice"),
    ({"kv_bias_correction": "magic"}, "unknown kv_bias_correction"),
    ({"cache_text_kv": "yes"}, "cache_text_kv must be True or False"),
    ({"bits": None}, "nothing to do"),
    ({"modules_to_not_convert": [3]}, "modules_to_not_convert must be a list"),
    ({"block_values": 1000}, "block_values must be a power of two"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"quantize_batch_values": -1}, "quantize_batch_values must be a non-negative integer"),
    ({"quantize_batch_values": 1.5}, "quantize_batch_values must be a non-negative integer"),
    ({"quantize_device": "tpu"}, "quantize_device must be 'auto', 'weight', or a cpu/cuda device string"),
    ({"quantize_device": 3}, "quantize_device must be 'auto', 'weight', or a cpu/cuda device string"),
    ({"bitz": 4}, "unknown HyperQuantConfig argument"),
])
def test_bad_config_named_error(kwargs, needle):
    with pytest.raises(HyperQuantConfigError) as e:
        HyperQuantConfig(**kwargs)
    assert needle in str(e.value)


def test_config_roundtrip_json():
    c = HyperQuantConfig(bits=3.5, lattice="d4", tile_size=64, mma="fp8", residency="compressed",
                         modules_to_not_convert=["attn2"], kv_bits=4.0, cache_text_kv=True)
    d = json.loads(c.to_json_string())
    c2 = HyperQuantConfig.from_dict(d)
    assert c2.to_dict() == c.to_dict() and c2.lattice == "D4" and d["quant_method"] == "hyperquant"
    with pytest.raises(UnsupportedFormatVersionError):
        HyperQuantConfig.from_dict({**d, "format_version": 99})


def test_lattice_linear_reference_is_exact_math_of_codes():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    x = torch.randn(4, 3, 128)
    for res in ("int8", "compressed"):
        m = LatticeLinear.from_linear(lin, bits=5.0, tile_size=32, residency=res)
        q = m.lattice_tensor()
        # float64 reference: x @ W_hat^T + b with W_hat = inverse RHT of the decoded lattice points
        w_hat = inverse_rht(q.rotated(torch.float64), q.signs.double(), q.tile_size)
        ref = x.double() @ w_hat.T + lin.bias.detach().double()
        assert float((m(x).double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
        # the codes are the codec's: same words as quantizing the weight directly
        q0 = quantize(lin.weight.detach(), bits=5.0, tile_size=32)
        assert torch.equal(q.words, q0.words) and torch.equal(q.scales, q0.scales)
        codes, scale = m.int8_weight()
        assert codes.dtype == torch.int8 and codes.shape == (48, 128) and scale.shape == (48,)
        assert torch.equal(codes.float() * scale[:, None], q.rotated())
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(2, 64))


@pytest.fixture(scope="module")
def small_ckpt(tiny_ltx_path, tmp_path_factory):
    """LTX-Video transformer quantized at tile 128 (2 layers: fast) and saved."""
    tr = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_path, subfolder="transformer",
                                                    quantization_config=HyperQuantConfig(bits=4.0, tile_size=128))
    out = str(tmp_path_factory.mktemp("small_ckpt"))
    tr.save_pretrained(out)
    return tr, out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_small_ckpt_reloads_bit_exact(small_ckpt):
    tr, out = small_ckpt
    tr2 = LTXVideoTransformer3DModel.from_pretrained(out)
    sa, sb = tr.state_dict(), tr2.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_truncated_checkpoint(small_ckpt, tmp_path):
    d = _copy(small_ckpt[1], tmp_path / "t")
    p = os.path.join(d, ST)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(TruncatedCheckpointError, match="truncated"):
        LTXVideoTransformer3DModel.from_pretrained(d)


def test_unknown_format_version_in_config(small_ckpt, tmp_path):
    d = _copy(small_ckpt[1], tmp_path / "v")
    cp = os.path.join(d, "config.json")
    cfg = json.load(open(cp))
    cfg["quantization_config"]["format_version"] = 2
    json.dump(cfg, open(cp, "w"))
    with pytest.raises(UnsupportedFormatVersionError, match="format version 2"):
        LTXVideoTransformer3DModel.from_pretrained(d)


def test_unknown_format_version_in_file(small_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(small_ckpt[1], tmp_path / "vf")
    p = os.path.join(d, ST)
    save_file(load_file(p), p, metadata={"format": "pt", "hyperquant_format_version": "7"})
    with pytest.raises(UnsupportedFormatVersionError, match="version 7"):
        LTXVideoTransformer3DModel.from_pretrained(d)


def test_mismatched_shapes(small_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    # (a) a stored code stream of the wrong length
    d = _copy(small_ckpt[1], tmp_path / "s")
    p = os.path.join(d, ST)
    sd = load_file(p)
    key = next(k for k in sd if k.endswith("hq_words"))
    sd[key] = sd[key][:-3].clone()
    save_file(sd, p, metadata={"format": "pt", "hyperquant_format_version": "1"})
    with pytest.raises(CheckpointShapeError, match="hq_words"):
        LTXVideoTransformer3DModel.from_pretrained(d)
    # (b) the layout disagrees with the model's linear shape
    d2 = _copy(small_ckpt[1], tmp_path / "s2")
    cp = os.path.join(d2, "config.json")
    cfg = json.load(open(cp))
    name = next(iter(cfg["quantization_config"]["layout"]))
    cfg["quantization_config"]["layout"][name]["shape"] = [64, 512]
    json.dump(cfg, open(cp, "w"))
    with pytest.raises(CheckpointShapeError, match="layout"):
        LTXVideoTransformer3DModel.from_pretrained(d2)


def test_missing_quantized_tensor(small_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(small_ckpt[1], tmp_path / "m")
    p = os.path.join(d, ST)
    sd = load_file(p)
    del sd[next(k for k in sd if k.endswith("hq_scales"))]
    save_file(sd, p, metadata={"format": "pt", "hyperquant_format_version": "1"})
    with pytest.raises(CheckpointFormatError, match="hq_scales"):
        LTXVideoTransformer3DModel.from_pretrained(d)


def test_unquantizable_module_named_error(tiny_ltx_path):
    # explicitly asking for proj_in (in_features=8, not a multiple of the tile) is refused by name
    cfg = HyperQuantConfig(bits=4.0, tile_size=64, modules_to_convert=["proj_in"])
    with pytest.raises(UnquantizableModuleError, match="proj_in"):
        LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_path, subfolder="transformer", quantization_config=cfg)


@pytest.mark.parametrize("batch_values", [0, 1 << 28])
def test_non_finite_weight_named_error_on_load(tmp_path, batch_values):
    """A NaN in a weight quantized while loading gets UnquantizableModuleError naming the module, on the diffusers
    side and on the transformers side (where the loader would otherwise fold it into a generic loading report)."""
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    te = T5EncoderModel(T5Config(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu"))
    with torch.no_grad():
        te.encoder.block[0].layer[1].DenseReluDense.wo.weight[3, 5] = float("nan")
    te.save_pretrained(tmp_path / "te")
    cfg = HyperQuantConfig(bits=4.0, tile_size=64, quantize_batch_values=batch_values)
    with pytest.raises(UnquantizableModuleError, match=r"DenseReluDense\.wo.*NaN"):
        T5EncoderModel.from_pretrained(tmp_path / "te", quantization_config=cfg)

    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                    num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
                                    num_layers=1, caption_channels=64)
    tr.save_pretrained(tmp_path / "tr")
    sd = load_file(tmp_path / "tr" / ST)
    sd["transformer_blocks.0.ff.net.2.weight"][0, 0] = float("inf")
    save_file(sd, tmp_path / "tr" / ST, metadata={"format": "pt"})
    with pytest.raises(UnquantizableModuleError, match=r"ff\.net\.2.*NaN or infinite"):
        LTXVideoTransformer3DModel.from_pretrained(tmp_path / "tr", quantization_config=cfg)


def test_save_pretrained_atomic(small_ckpt, tmp_path):
    tr, _ = small_ckpt
    out = tmp_path / "atomic"
    hyperquant_diffusers.save_pretrained_atomic(tr, out)
    assert os.path.exists(out / ST) and not [p for p in os.listdir(tmp_path) if p.startswith(".hq-")]

    class Boom:
        def save_pretrained(self, d, **kw):
            open(os.path.join(d, "partial"), "w").write("x")
            raise OSError("disk full")

    with pytest.raises(OSError):
        hyperquant_diffusers.save_pretrained_atomic(Boom(), out)
    assert os.path.exists(out / ST) and not os.path.exists(out / "partial")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hq-")]


def test_one_config_reused_for_two_models(tiny_ltx_path, tiny_ltx2_path, tmp_path):
    """A user config object reused across from_pretrained calls must not leak one model's layout into another."""
    from diffusers import LTX2VideoTransformer3DModel

    cfg = HyperQuantConfig(bits=4.0, tile_size=128)
    a = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx_path, subfolder="transformer", quantization_config=cfg)
    b = LTX2VideoTransformer3DModel.from_pretrained(tiny_ltx2_path, subfolder="transformer", quantization_config=cfg)
    assert cfg.layout is None
    assert len(a.config.quantization_config.layout) == 2 and len(b.config.quantization_config.layout) == 4
    a.save_pretrained(tmp_path / "a")
    a2 = LTXVideoTransformer3DModel.from_pretrained(tmp_path / "a")
    assert sorted(a2.config.quantization_config.layout) == sorted(a.config.quantization_config.layout)


def test_residency_memory_and_int8_overflow_fallback():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    m_c = LatticeLinear.from_linear(lin, bits=4.0, tile_size=128, residency="compressed")
    m_i = LatticeLinear.from_linear(lin, bits=4.0, tile_size=128, residency="int8")
    # compressed-resident: exactly the stored stream (+ float32 signs for the RHT); int8: codes + scales + signs
    assert m_c.resident_nbytes() == m_c.stored_nbytes() + 4 * 128
    assert m_i.resident_nbytes() == 64 * 128 + 4 * 64 + 4 * 128
    assert m_c.stored_nbytes() == m_i.stored_nbytes()  # int8 re-encodes the identical stream
    assert m_c.stored_nbytes() < 0.3 * 2 * 64 * 128
    x = torch.randn(5, 128)
    assert torch.equal(m_c(x), m_i(x))
    # Z at 8 bps: coordinates beyond +-127, so the int8 cast would clip -> the layer stays compressed-resident
    m_z = LatticeLinear.from_linear(lin, bits=8.0, lattice="Z", tile_size=128, residency="int8")
    assert m_z.residency == "compressed" and m_z.codes is None and "residency=compressed" in repr(m_z)
    assert int(m_z.lattice_tensor().decode_coords().abs().max()) > 127


def test_quantize_device_choice(monkeypatch):
    """"auto" sends CPU weights to the GPU only when there is one; "weight" keeps them; an explicit device wins;
    the setting survives the config round trip."""
    cfg = HyperQuantConfig(bits=4.0)
    assert cfg.quantize_device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.quantize_device_for(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert cfg.quantize_device_for(torch.device("cpu")) == torch.device("cuda", 1)
    assert cfg.quantize_device_for(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert HyperQuantConfig(bits=4.0, quantize_device="weight").quantize_device_for(torch.device("cpu")).type == "cpu"
    assert HyperQuantConfig(bits=4.0, quantize_device="cpu").quantize_device_for(torch.device("cuda", 0)).type == "cpu"
    again = HyperQuantConfig.from_dict(HyperQuantConfig(bits=4.0, quantize_device="cuda:1").to_dict())
    assert again.quantize_device == "cuda:1"


def test_cpu_weights_quantized_where_configured_land_on_their_device(monkeypatch):
    """With quantize_device set to another device than the weight's, the codes come back to the weight's device;
    here both are the CPU ("cpu" vs "weight") and the results must be identical."""
    from hyperquant_diffusers.quantizers import core

    lin = torch.nn.Linear(256, 128)
    outs = []
    for dev in ("weight", "cpu"):
        model = torch.nn.Sequential(torch.nn.Linear(256, 128))
        model[0].load_state_dict(lin.state_dict())
        cfg = HyperQuantConfig(bits=4.0, quantize_device=dev)
        core.quantize_linear(model, "0", model[0], model[0].weight, cfg)
        outs.append(model[0])
    assert outs[0].hq_words.device.type == "cpu"
    assert torch.equal(outs[0].hq_words, outs[1].hq_words)
