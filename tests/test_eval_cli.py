"""hyperquant-eval / hyperquant-generate from the command line: config grammar, bad inputs, and one real run of
the embedded tiny LTX-2 pipeline (random weights) through the HyperQuant backend, resumed on a second run."""

import json
import os
import shutil

import numpy as np
import pytest

from hyperquant_diffusers.eval import cli, generate
from hyperquant_diffusers.eval.configs import ConfigNameError, parse_config, parse_config_list
from hyperquant_diffusers.eval.pipeline import EMBEDDED_VERSION


@pytest.mark.parametrize("name, weights, kv", [
    ("bf16", {}, {}),
    ("w4-e8", {"bits": 4.0, "lattice": "E8"}, {}),
    ("W3-D4", {"bits": 3.0, "lattice": "D4"}, {}),
    ("w2p5-a2", {"bits": 2.5, "lattice": "A2"}, {}),
    ("w6-z", {"bits": 6.0, "lattice": "Z"}, {}),
    ("w4-e8+kv4", {"bits": 4.0, "lattice": "E8"}, {"kv_bits": 4.0, "cache_text_kv": True}),
    ("w4-e8+kv3.5-qjl", {"bits": 4.0, "lattice": "E8"},
     {"kv_bits": 3.5, "cache_text_kv": True, "kv_bias_correction": "qjl"}),
])
def test_config_names(name, weights, kv):
    c = parse_config(name)
    assert c.weight_kwargs == weights and c.kv_kwargs == kv and c.name == name.lower()
    assert c.bits_per_scalar == weights.get("bits", 16.0)


def test_bf16_plus_kv_means_float_weights():
    c = parse_config("bf16+kv4")
    assert c.quant_kwargs == {"bits": None, "kv_bits": 4.0, "cache_text_kv": True} and not c.is_baseline


@pytest.mark.parametrize("bad", ["w4", "w4-e9", "int8", "w9-e8", "w0.5-e8", "w4-e8+kv4+kv2", "w4-e8+kv4-foo", "", "fp16"])
def test_unknown_config_names_list_the_grammar(bad):
    with pytest.raises(ConfigNameError, match="config names: 'bf16'"):
        parse_config(bad)


def test_config_list_puts_baseline_first_and_rejects_duplicates():
    assert [c.name for c in parse_config_list("w4-e8,bf16")] == ["bf16", "w4-e8"]
    assert [c.name for c in parse_config_list("w4-e8")] == ["bf16", "w4-e8"]
    with pytest.raises(ConfigNameError, match="twice"):
        parse_config_list("w4-e8,W4-E8")


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli.main(["--prompts", str(tmp_path / "missing.txt"), "--out", out]) == 2
    assert "prompt file" in capsys.readouterr().err
    assert cli.main(["--configs", "bf16,w4-e9", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown lattice 'e9'" in err and "config names:" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert cli.main(["--prompts", str(empty), "--out", out]) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert cli.main(["--seeds", "0,x", "--out", out]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli.main(["--pipeline-kwargs", "[1]", "--out", out]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert cli.main(["--dtype", "int4", "--out", out]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing is created before the inputs are valid
    assert generate.main(["--prompt", "a cat", "--bits", "4", "--lattice", "E9", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "unknown lattice" in capsys.readouterr().err
    assert generate.main(["--prompt", "a cat", "--out", str(tmp_path / "v.avi")]) == 2
    assert ".mp4 or .gif" in capsys.readouterr().err


def test_embedded_default_end_to_end_and_resume(tmp_path, tiny_ltx2_path, capsys):
    """The real path: tiny LTX-2 (random weights) -> bf16 and w4-e8 via PipelineQuantizationConfig -> report."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_ltx2_path, cache / f"tiny-ltx2-random-v{EMBEDDED_VERSION}")  # what --cache-dir would build
    out = tmp_path / "report"
    argv = ["--out", str(out), "--cache-dir", str(cache), "--configs", "bf16,w4-e8", "--prompt",
            "a robot dancing in the city", "--frames", "9", "--steps", "2", "--lpips-backbone", "off", "--quiet"]
    assert cli.main(argv) == 0
    r = json.load(open(out / "results.json"))
    assert r["model"]["random_weights"] is True and "RANDOM weights" in r["model"]["note"]
    assert "RANDOM WEIGHTS" in (out / "index.html").read_text() and "RANDOM WEIGHTS" in (out / "README.md").read_text()
    assert r["same_initial_noise"] is True  # both configs started from the same latents
    (c,) = r["comparisons"]
    psnr = np.array([float(x) for x in c["psnr_db"]])
    assert c["num_frames"] == 9 and psnr.shape == (9,)
    # quantized != baseline but close: finite PSNR well above that of unrelated frames (~8 dB)
    assert np.all(np.isfinite(psnr)) and np.all(psnr > 20), psnr
    w4 = r["configs"][1]
    assert w4["quantized_linears"]["lattice_linears"] > 0
    assert 3.0 < w4["quantized_linears"]["bits_per_scalar_stored"] <= 4.5
    assert w4["compression_vs_baseline"] > 1.0
    assert all(v["seconds_per_step"] and len(v["seconds_per_step"]) == 2 for v in r["videos"])
    frames = np.load(out / r["videos"][0]["frames_file"])
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    # second run: nothing regenerated, same numbers
    capsys.readouterr()
    assert cli.main(argv) == 0
    r2 = json.load(open(out / "results.json"))
    assert r2["run"] == {"generated": 0, "resumed": 2}
    assert r2["comparisons"][0]["psnr_db"] == c["psnr_db"]


def test_default_prompt_file_and_fallback_agree():
    """samples/prompts.txt is the default; installs without the repo fall back to the same list in code."""
    from hyperquant_diffusers.eval.prompts import DEFAULT_PROMPTS, FALLBACK_PROMPTS, read_prompts

    assert os.path.isfile(DEFAULT_PROMPTS)
    assert tuple(p["text"] for p in read_prompts(None)) == FALLBACK_PROMPTS
    ids = [p["id"] for p in read_prompts(None)]
    assert ids[0].startswith("p00-a-robot-dancing") and len(set(ids)) == len(ids)


def test_generate_compiled_matches_eager(tmp_path, tiny_ltx2_path, capsys):
    """hyperquant-generate --compile: the same video as without it, to a few 8-bit levels (Inductor fuses
    the float32 work around the quantized layers and rounds it differently), through the real loader."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cache = tmp_path / "cache"
    shutil.copytree(tiny_ltx2_path, cache / f"tiny-ltx2-random-v{EMBEDDED_VERSION}")
    frames = {}
    for tag, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / f"{tag}.gif"
        argv = ["--prompt", "a robot dancing", "--bits", "4", "--cache-dir", str(cache), "--frames", "9",
                "--steps", "2", "--out", str(out), "--save-frames", "--device", "cpu"] + extra
        assert generate.main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["quantized_linears"]["transformer"]["lattice_linears"] > 0
        frames[tag] = np.load(tmp_path / f"{tag}.npy").astype(np.int16)
        # Dynamo made graphs only for the compiled run, and none of them broke
        assert (counters["stats"]["unique_graphs"] > 0) == bool(extra) and not counters["graph_break"]
    torch._dynamo.reset()
    assert frames["eager"].shape == (9, 32, 32, 3)
    # rounding differences, not a different video: measured mean 0.37-0.39 levels, 1.6-1.7% of values off by more
    # than one level, the largest 2 or 3 (two sets of codes of the same weights: 2026-12-03, before and after the
    # per-piece rate of stacked groups)
    d = np.abs(frames["compiled"] - frames["eager"])
    assert d.max() <= 3 and d.mean() < 0.5 and (d > 1).mean() < 0.03
    assert frames["eager"].std() > 5          # a real video, not a constant


def test_lora_in_every_configuration(tmp_path, tiny_ltx2_path, capsys):
    """``--lora``: the same LoRA in the baseline and the quantized config. The quantized video stays close to the
    LoRA'd baseline, the LoRA changes both videos, the report names it, and another LoRA file at the same path (new
    bytes) is not mistaken for the stored videos."""
    import torch
    from diffusers import LTX2Pipeline

    cache = tmp_path / "cache"
    shutil.copytree(tiny_ltx2_path, cache / f"tiny-ltx2-random-v{EMBEDDED_VERSION}")
    pipe = LTX2Pipeline.from_pretrained(tiny_ltx2_path)
    g = torch.Generator().manual_seed(5)
    layers = {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and ".ff." in name:  # the layers EMBEDDED_QUANT_KWARGS quantizes
            layers[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            layers[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    lora_dir = tmp_path / "lora"
    LTX2Pipeline.save_lora_weights(str(lora_dir), transformer_lora_layers=layers)
    base = ["--cache-dir", str(cache), "--configs", "bf16,w4-e8", "--prompt", "a robot dancing in the city",
            "--lpips-backbone", "off", "--quiet"]
    assert cli.main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "lora"), "--lora", str(lora_dir)]) == 0
    def results(d):
        with open(tmp_path / d / "results.json") as f:
            return json.load(f)

    plain, lora = results("plain"), results("lora")
    assert lora["settings"]["lora"]["weight_name"] == "pytorch_lora_weights.safetensors"
    assert "LoRA " in (tmp_path / "lora" / "index.html").read_text()
    w4 = lora["configs"][1]
    assert w4["quantized_linears"]["lattice_linears"] > 0

    def frames(r, d, cfg):
        v = next(v for v in r["videos"] if v["config"] == cfg)
        return np.load(tmp_path / d / v["frames_file"]).astype(np.float64)

    for cfg in ("bf16", "w4-e8"):  # the LoRA reached both configurations
        assert np.abs(frames(lora, "lora", cfg) - frames(plain, "plain", cfg)).max() > 20
    psnr = np.array([float(x) for x in lora["comparisons"][0]["psnr_db"]])
    assert np.all(psnr > 20), psnr
    # --fuse-lora: fused into the bf16 weights (= the unfused baseline up to bf16 rounding) and into re-quantized
    # codes (another video than the unfused one)
    assert cli.main(base + ["--out", str(tmp_path / "fused"), "--lora", str(lora_dir), "--fuse-lora"]) == 0
    fused = results("fused")
    assert fused["settings"]["lora"]["fuse"] is True and "fused into the weights" in \
        (tmp_path / "fused" / "index.html").read_text()
    assert fused["run"] == {"generated": 2, "resumed": 0}      # not the unfused run's videos
    # the strong LoRA survives re-quantization: the kept fraction is reported, and absent without a fused LoRA
    kept = fused["configs"][1]["quantized_linears"]["fused_lora_kept"]
    n_ff = len(layers) // 2
    assert kept["layers"] == n_ff and kept["min"] > 0.9, kept
    assert lora["configs"][1]["quantized_linears"]["fused_lora_kept"] is None
    assert f"keep at least {100 * kept['min']:.0f}% of its weight change ({n_ff} layers)" in \
        (tmp_path / "fused" / "index.html").read_text()
    bf16_gap = np.abs(frames(fused, "fused", "bf16") - frames(lora, "lora", "bf16"))
    print(f"--fuse-lora bf16 frames vs unfused: max {bf16_gap.max():.0f}, mean {bf16_gap.mean():.3f} levels")
    assert bf16_gap.max() <= 8 and bf16_gap.mean() < 0.5   # the merged weight rounded to bf16: a level or so
    assert np.abs(frames(fused, "fused", "w4-e8") - frames(lora, "lora", "w4-e8")).max() > 0
    fused_psnr = np.array([float(x) for x in fused["comparisons"][0]["psnr_db"]])
    print(f"--lora PSNR vs the LoRA'd bf16: unfused {psnr.mean():.2f} dB, fused {fused_psnr.mean():.2f} dB")
    # fusing re-quantizes the delta too: the error scales with |W + dW|, here 2.6-5.3x |W| (a deliberately strong
    # random LoRA), so well below the unfused adapter's PSNR (measured 48.1 -> 38.6 dB); unfused, it stays exact
    assert np.all(fused_psnr > 30) and fused_psnr.mean() < psnr.mean(), (fused_psnr, psnr)
    # same path, other bytes: regenerated, not resumed
    LTX2Pipeline.save_lora_weights(str(lora_dir), transformer_lora_layers={k: 2 * v for k, v in layers.items()})
    assert cli.main(base + ["--out", str(tmp_path / "lora"), "--lora", str(lora_dir)]) == 0
    assert results("lora")["run"] == {"generated": 2, "resumed": 0}
    capsys.readouterr()
    assert cli.main(base + ["--out", str(tmp_path / "x"), "--lora-scale", "0.5"]) == 2
    assert "--lora-scale needs --lora" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "x"), "--fuse-lora"]) == 2
    assert "--fuse-lora needs --lora" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "x"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
