"""The evaluation harness without a model: resume, results.json schema, report files, shard split/merge.

Frames come from :class:`NoisyBackend`, a deterministic frame source with a KNOWN error per configuration
(+-d on every value, so PSNR = 20 log10(255/d) exactly), standing in for a pipeline so that the harness's own
numbers can be checked against closed forms. The real pipeline path is covered in test_eval_cli.py.
"""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hyperquant_diffusers.eval.configs import parse_config_list
from hyperquant_diffusers.eval.metrics import FramesMismatchError
from hyperquant_diffusers.eval.pipeline import GenerationResult
from hyperquant_diffusers.eval.report import write_report
from hyperquant_diffusers.eval.results import build_results
from hyperquant_diffusers.eval.runner import Job, Settings, run_shard

#: +-d per config name (0: identical to the baseline)
DELTAS = {"w6-e8": 2, "w4-e8": 8, "w8-e8": 0}
SHAPE = (5, 16, 24, 3)
BASE_BYTES = {"transformer": 4000, "text_encoder": 1000, "vae": 300}
Q_BYTES = {"transformer": 1000, "text_encoder": 250, "vae": 300}


class NoisyBackend:
    """Baseline frames: a fixed function of (prompt, seed) in [16, 239]; config c: baseline +- DELTAS[c]."""

    def __init__(self, model_path=None, settings=None, shape=SHAPE, bad_config=None, failing_config=None):
        self.shape, self.bad_config, self.failing_config = shape, bad_config, failing_config
        self.loaded, self.generated = [], []

    def load(self, config):
        if config.name == self.failing_config:
            raise ValueError("tile_size 128 does not divide the head dimension 16")
        self.loaded.append(config.name)
        return config, {"load_seconds": 0.5, "component_bytes": dict(BASE_BYTES if config.is_baseline else Q_BYTES),
                        "quant_stats": {} if config.is_baseline else {"transformer": {
                            "lattice_linears": 3, "quantized_params": 1000, "stored_bytes": 500,
                            "resident_bytes": 1000, "dense_bf16_bytes": 2000}}}

    def generate(self, config, job):
        self.generated.append((config.name, job.pid, job.seed))
        key = int(hashlib.sha256(f"{job.prompt}|{job.seed}".encode()).hexdigest()[:8], 16)
        shape = self.shape if config.name != self.bad_config else (self.shape[0] - 1,) + self.shape[1:]
        base = np.random.default_rng(key).integers(16, 240, size=shape).astype(np.int16)
        d = DELTAS.get(config.name, 0)
        signs = np.random.default_rng(key + 1).choice([-1, 1], size=shape)
        frames = (base + d * signs).astype(np.uint8)
        return GenerationResult(frames=frames, seconds_per_step=[0.25, 0.75], seconds_total=1.5,
                                peak_memory_bytes=1000 + d, peak_memory_kind="test",
                                initial_noise_sha256=f"noise-{key}")

    def unload(self, handle):
        pass


def _settings(**kw):
    base = dict(model_id="test:noisy", embedded=False, frames=SHAPE[0], height=SHAPE[1], width=SHAPE[2], steps=2,
                frame_rate=8.0)
    base.update(kw)
    return Settings(**base)


JOBS = [Job("p00-a-robot-aaaaaaaa", "a robot", 0), Job("p01-a-cat-bbbbbbbb", "a cat", 0),
        Job("p00-a-robot-aaaaaaaa", "a robot", 1)]
PROMPTS = [{"id": "p00-a-robot-aaaaaaaa", "text": "a robot"}, {"id": "p01-a-cat-bbbbbbbb", "text": "a cat"}]
NO_LPIPS = {"available": False, "net": "alex", "lpips_version": "0.1", "backbone_source": "none",
            "backbone_sha256": None, "reference_backbone": True, "unavailable_reason": "test: off",
            "upsample_factor": 1}


def _evaluate(out, backend, configs="bf16,w4-e8,w6-e8,w8-e8", settings=None):
    cfgs = parse_config_list(configs)
    settings = settings or _settings()
    shard = run_shard(str(out), JOBS, cfgs, backend, settings, None, log=lambda m: None)
    results = build_results([shard], cfgs, PROMPTS, settings.to_json(), NO_LPIPS, seeds=[0, 1], num_processes=1)
    return shard, results


def _strict_load(path):
    def no_const(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    with open(path) as f:
        return json.load(f, parse_constant=no_const)


TOP_KEYS = {"schema", "schema_version", "created_utc", "versions", "model", "settings", "number_format", "lpips",
            "prompts", "configs", "videos", "comparisons", "aggregate", "same_initial_noise", "failures", "run"}
CONFIG_KEYS = {"name", "is_baseline", "weight_kwargs", "kv_kwargs", "bits_per_scalar_nominal", "component_bytes",
               "quantized_linears", "quantized_components", "quantized_components_bytes", "compression_vs_baseline",
               "bits_per_scalar_effective", "load_seconds", "seconds_per_step_mean", "seconds_total_mean",
               "peak_memory_bytes", "peak_memory_kind", "num_videos", "error"}
COMPARISON_KEYS = {"config", "prompt_id", "seed", "num_frames", "psnr_db", "mse", "lpips", "psnr_video_db",
                   "psnr_mean_db", "psnr_min_db", "psnr_max_db", "lpips_mean", "lpips_max"}
VIDEO_KEYS = {"config", "prompt_id", "seed", "video_file", "frames_file", "seconds_per_step", "seconds_total",
              "peak_memory_bytes", "peak_memory_kind", "initial_noise_sha256"}
AGG_KEYS = {"psnr_mean_db", "psnr_min_db", "lpips_mean", "per_frame_psnr_db", "num_videos"}
SETTINGS_KEYS = {"model_id", "embedded", "frames", "height", "width", "steps", "guidance_scale", "negative_prompt",
                 "max_sequence_length", "frame_rate", "dtype", "device", "quant_kwargs", "extra", "seeds",
                 "num_processes", "compile", "lora"}


def test_results_numbers_schema_and_report(tmp_path):
    backend = NoisyBackend()
    shard, results = _evaluate(tmp_path, backend)
    assert shard["counts"] == {"generated": 12, "resumed": 0} and results["run"] == {"generated": 12, "resumed": 0}
    paths = write_report(str(tmp_path), results, log=lambda m: None)
    r = _strict_load(tmp_path / "results.json")
    # stable schema
    assert set(r) == TOP_KEYS and r["schema_version"] == 1 and r["schema"] == "hyperquant-eval/results"
    assert set(r["settings"]) == SETTINGS_KEYS
    assert all(set(c) == CONFIG_KEYS for c in r["configs"])
    assert all(set(c) == COMPARISON_KEYS for c in r["comparisons"])
    assert all(set(v) == VIDEO_KEYS for v in r["videos"])
    assert all(set(a) == AGG_KEYS for a in r["aggregate"].values())
    assert [c["name"] for c in r["configs"]] == ["bf16", "w4-e8", "w6-e8", "w8-e8"]
    assert len(r["comparisons"]) == 9 and len(r["videos"]) == 12
    # closed-form PSNR of +-d: 20 log10(255/d); d = 0 -> "inf" everywhere
    for c in r["comparisons"]:
        d = DELTAS[c["config"]]
        if d == 0:
            assert c["psnr_db"] == ["inf"] * SHAPE[0] and c["psnr_mean_db"] == "inf" and c["psnr_video_db"] == "inf"
            assert c["mse"] == [0.0] * SHAPE[0]
        else:
            np.testing.assert_allclose([float(x) for x in c["psnr_db"]], 20 * math.log10(255 / d), atol=1e-9)
            np.testing.assert_allclose(c["mse"], d * d, atol=1e-12)
        assert c["lpips"] is None and c["lpips_mean"] is None
    agg = r["aggregate"]
    assert abs(agg["w4-e8"]["psnr_mean_db"] - 20 * math.log10(255 / 8)) < 1e-9
    assert agg["w8-e8"]["per_frame_psnr_db"]["mean"] == ["inf"] * SHAPE[0]
    assert len(agg["w6-e8"]["per_frame_psnr_db"]["max"]) == SHAPE[0]
    # sizes, timing, memory from the backend's reports
    cfg = {c["name"]: c for c in r["configs"]}
    assert cfg["w4-e8"]["compression_vs_baseline"] == pytest.approx(5000 / 1250)
    assert cfg["w4-e8"]["bits_per_scalar_effective"] == pytest.approx(16 * 1250 / 5000)
    assert cfg["w4-e8"]["quantized_linears"]["bits_per_scalar_stored"] == pytest.approx(8 * 500 / 1000)
    assert cfg["w4-e8"]["quantized_linears"]["compression_stored_vs_bf16"] == pytest.approx(4.0)
    assert cfg["bf16"]["quantized_linears"] is None and cfg["bf16"]["compression_vs_baseline"] == 1.0
    assert cfg["w6-e8"]["seconds_per_step_mean"] == pytest.approx(0.5)
    assert cfg["w4-e8"]["peak_memory_bytes"] == 1008
    assert r["same_initial_noise"] is True and r["failures"] == {}
    assert r["model"]["random_weights"] is False
    # report files exist and say what they should
    html = (tmp_path / "index.html").read_text()
    md = (tmp_path / "README.md").read_text()
    for text in (html, md):
        assert "∞ (identical)" in text and "LPIPS not computed: test: off" in text
        assert f"{20 * math.log10(255 / 8):.2f}" in text
    assert (tmp_path / paths["psnr_curves"]).stat().st_size > 1000
    assert len(paths["strips"]) == 3 and all((tmp_path / s["png"]).is_file() for s in paths["strips"])
    assert paths["lpips_bars"] is None
    for v in r["videos"]:
        assert (tmp_path / v["video_file"]).is_file() and (tmp_path / v["frames_file"]).is_file()


def test_lpips_in_results_and_report_with_injected_trunk(tmp_path):
    """INJECTED random AlexNet trunk (labelled non-reference): the report must say its numbers are not LPIPS."""
    import torch
    import torchvision

    from hyperquant_diffusers.eval.lpips_backbone import build_lpips_from_state_dict

    torch.manual_seed(0)
    info = build_lpips_from_state_dict(torchvision.models.alexnet(weights=None).state_dict(),
                                       "injected random test trunk", is_reference=False)
    cfgs = parse_config_list("bf16,w4-e8,w8-e8")
    settings = _settings()
    shard = run_shard(str(tmp_path), JOBS[:2], cfgs, NoisyBackend(), settings, info, log=lambda m: None)
    lp_json = {**info.to_json(), "upsample_factor": 4}
    results = build_results([shard], cfgs, PROMPTS, settings.to_json(), lp_json, seeds=[0, 1], num_processes=1)
    by = {c["config"]: c for c in results["comparisons"] if c["prompt_id"].startswith("p00")}
    assert by["w8-e8"]["lpips"] == [0.0] * SHAPE[0] and by["w8-e8"]["lpips_mean"] == 0.0
    assert all(x > 0 for x in by["w4-e8"]["lpips"])
    assert by["w4-e8"]["lpips_mean"] == pytest.approx(np.mean(by["w4-e8"]["lpips"]))
    paths = write_report(str(tmp_path), results, log=lambda m: None)
    assert paths["lpips_bars"] and (tmp_path / paths["lpips_bars"]).stat().st_size > 1000
    html = (tmp_path / "index.html").read_text()
    assert "INJECTED, NON-REFERENCE" in html and "enlarged ×4" in html


def test_resume_skips_finished_videos(tmp_path):
    first = NoisyBackend()
    _evaluate(tmp_path, first)
    assert len(first.generated) == 12
    again = NoisyBackend()
    shard, results = _evaluate(tmp_path, again)
    assert again.generated == [] and again.loaded == [] and shard["counts"] == {"generated": 0, "resumed": 12}
    assert results["configs"][1]["load_seconds"] == 0.5  # config info kept from the first run
    # a half-finished video (metadata missing = not marked done) is regenerated, and only that one
    os.unlink(tmp_path / "videos" / "w6-e8" / "p01-a-cat-bbbbbbbb-s0.json")
    third = NoisyBackend()
    _evaluate(tmp_path, third)
    assert third.generated == [("w6-e8", "p01-a-cat-bbbbbbbb", 0)]
    # a new configuration generates only its own videos
    fourth = NoisyBackend()
    _evaluate(tmp_path, fourth, configs="bf16,w4-e8,w6-e8,w8-e8,w3-d4")
    assert {g[0] for g in fourth.generated} == {"w3-d4"} and len(fourth.generated) == 3
    # another GPU index is the same device type: videos are reused
    moved = NoisyBackend()
    _evaluate(tmp_path, moved, configs="bf16,w4-e8,w6-e8,w8-e8,w3-d4", settings=_settings(device="cuda:3"))
    _evaluate(tmp_path, NoisyBackend(), configs="bf16,w4-e8,w6-e8,w8-e8,w3-d4", settings=_settings(device="cuda:1"))
    assert len(moved.generated) == 15  # cpu -> cuda: regenerated
    again_gpu = NoisyBackend()
    _evaluate(tmp_path, again_gpu, configs="bf16,w4-e8,w6-e8,w8-e8,w3-d4", settings=_settings(device="cuda:0"))
    assert again_gpu.generated == []
    # changed settings (more steps) invalidate everything
    fifth = NoisyBackend()
    _evaluate(tmp_path, fifth, settings=_settings(steps=3))
    assert len(fifth.generated) == 12


def test_frames_mismatch_between_configs_is_a_clear_error(tmp_path):
    with pytest.raises(FramesMismatchError, match=r"w4-e8 vs bf16 on p00-a-robot-aaaaaaaa seed 0.*\(5, 16, 24, 3\).*\(4, 16, 24, 3\)"):
        _evaluate(tmp_path, NoisyBackend(bad_config="w4-e8"), configs="bf16,w4-e8")


def test_a_failing_config_is_reported_and_the_rest_evaluated(tmp_path):
    shard, results = _evaluate(tmp_path, NoisyBackend(failing_config="w6-e8"))
    assert results["failures"] == {"w6-e8": "ValueError: tile_size 128 does not divide the head dimension 16"}
    assert {c["config"] for c in results["comparisons"]} == {"w4-e8", "w8-e8"}
    assert [c["error"] for c in results["configs"]] == [None, None, results["failures"]["w6-e8"], None]
    assert "w6-e8" not in results["aggregate"]
    write_report(str(tmp_path), results, log=lambda m: None)
    assert "FAILED: configuration w6-e8" in (tmp_path / "index.html").read_text()
    with pytest.raises(ValueError, match="head dimension"):  # a failing baseline is fatal
        _evaluate(tmp_path / "b", NoisyBackend(failing_config="bf16"))


HELPER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_eval_harness import NoisyBackend
    from hyperquant_diffusers.eval import cli
    args = cli.build_parser().parse_args({argv!r})
    res = cli.run(args, backend_factory=lambda path, settings: NoisyBackend())
    import json, os
    with open(os.path.join({out!r}, "ran-rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({{"has_results": bool(res)}}, f)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_prompts_and_rank0_merges(tmp_path):
    """Two CPU processes with torch.distributed env (what `accelerate launch --num_processes 2 --cpu` sets)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# test\na robot\na cat\na dog\n")
    out = tmp_path / "report"
    argv = ["--model", "test:noisy", "--prompts", str(prompts), "--configs", "bf16,w4-e8", "--out", str(out),
            "--frames", "5", "--height", "16", "--width", "24", "--steps", "2", "--lpips-backbone", "off",
            "--device", "cpu", "--quiet"]
    script = tmp_path / "helper.py"
    script.write_text(HELPER.format(tests=os.path.dirname(__file__), argv=argv, out=str(out)))
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.load(open(out / "ran-rank0.json")) == {"has_results": True}
    assert json.load(open(out / "ran-rank1.json")) == {"has_results": False}
    s0 = json.load(open(out / "shards" / "rank0-of-2.json"))
    s1 = json.load(open(out / "shards" / "rank1-of-2.json"))
    # accelerate's contiguous split: 3 prompts -> rank 0 gets 2, rank 1 gets 1
    assert sorted({v["prompt"] for v in s0["videos"]}) == ["a cat", "a robot"]
    assert [v["prompt"] for v in s1["videos"] if v["config"] == "bf16"] == ["a dog"]
    r = _strict_load(out / "results.json")
    assert r["settings"]["num_processes"] == 2
    assert [c["prompt_id"].split("-")[0] for c in r["comparisons"]] == ["p00", "p01", "p02"]
    np.testing.assert_allclose([float(x) for c in r["comparisons"] for x in c["psnr_db"]], 20 * math.log10(255 / 8))
    assert (out / "index.html").is_file()


def test_compile_setting_changes_video_fingerprints_only_when_on():
    """Videos stored before --compile existed keep their fingerprints (compile=False is left out of them); a
    compiled run's videos are distinct (Inductor may round differently)."""
    from hyperquant_diffusers.eval.configs import parse_config
    from hyperquant_diffusers.eval.runner import settings_fingerprint_payload, video_fingerprint
    from hyperquant_diffusers.eval.store import fingerprint

    off, on = _settings(), _settings(compile=True)
    payload = settings_fingerprint_payload(off)
    assert "compile" not in payload
    # the fingerprint of the same settings as the dataclass had them before the field was added
    old = {k: v for k, v in payload.items()}
    cfg, job = parse_config("w4-e8"), JOBS[0]
    assert video_fingerprint(off, cfg, job) == fingerprint({"settings": old, "config": cfg.to_json(),
                                                            "prompt": job.prompt, "seed": job.seed})
    assert settings_fingerprint_payload(on)["compile"] is True
    assert video_fingerprint(on, cfg, job) != video_fingerprint(off, cfg, job)


def test_lora_setting_changes_video_fingerprints_only_when_set():
    """Without --lora the fingerprints are those of before the option (lora=None is left out); a LoRA's SHA-256
    and scale are part of them."""
    from hyperquant_diffusers.eval.configs import parse_config
    from hyperquant_diffusers.eval.runner import settings_fingerprint_payload, video_fingerprint

    lora = {"source": "/x", "weight_name": "a.safetensors", "scale": 1.0, "sha256": "0" * 64}
    off = _settings()
    assert "lora" not in settings_fingerprint_payload(off)
    cfg, job = parse_config("w4-e8"), JOBS[0]
    fps = {video_fingerprint(s, cfg, job) for s in (off, _settings(lora=lora), _settings(lora={**lora, "scale": 0.5}),
                                                    _settings(lora={**lora, "sha256": "1" * 64}),
                                                    _settings(lora={**lora, "fuse": True}))}
    assert len(fps) == 5


def test_fused_lora_kept_fraction_reaches_results_and_report(tmp_path):
    """With a fused LoRA the backend reports, per component, the fraction of the LoRA's weight change the
    re-quantized codes keep; results.json totals it (min over components, layers summed) and the report states it,
    as a WARNING when a layer kept less than half (the LoRA was mostly rounded away)."""
    from hyperquant_diffusers.eval.report import notes

    kept_by_config = {"w4-e8": {"layers": 3, "min": 0.04, "median": 0.05},
                      "w6-e8": {"layers": 3, "min": 0.97, "median": 0.99}}

    class FusedBackend(NoisyBackend):
        def load(self, config):
            cfg, info = super().load(config)
            if config.name in kept_by_config:
                info["quant_stats"] = {
                    "transformer": {**info["quant_stats"]["transformer"], "fused_lora_kept": kept_by_config[config.name]},
                    "text_encoder": {**info["quant_stats"]["transformer"], "fused_lora_kept": None}}
            return cfg, info

    _, results = _evaluate(tmp_path, FusedBackend(), configs="bf16,w4-e8,w6-e8,w8-e8")
    by_name = {c["name"]: c for c in results["configs"]}
    assert by_name["w4-e8"]["quantized_linears"]["fused_lora_kept"] == {"layers": 3, "min": 0.04}
    assert by_name["w6-e8"]["quantized_linears"]["fused_lora_kept"] == {"layers": 3, "min": 0.97}
    assert by_name["w8-e8"]["quantized_linears"]["fused_lora_kept"] is None
    lines = [n for n in notes(results) if "fused LoRA" in n]
    assert len(lines) == 2
    assert lines[0].startswith("WARNING: w4-e8: the fused LoRA's re-quantized codes keep at least 4% of its weight "
                               "change (3 layers).")
    assert lines[1] == "w6-e8: the fused LoRA's re-quantized codes keep at least 97% of its weight change (3 layers)."
    write_report(str(tmp_path), results, log=lambda m: None)
    assert "WARNING: w4-e8: the fused LoRA" in (tmp_path / "index.html").read_text()
