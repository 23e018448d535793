"""Metric plumbing of hyperquant_diffusers.eval against direct scikit-image / lpips calls and closed forms.

LPIPS tests use an INJECTED AlexNet trunk with random (seeded) weights — labelled non-reference — because the
real ImageNet trunk needs the network; they check the plumbing (tensor layout, range, batching, upsampling,
weight loading), not LPIPS values.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from hyperquant_diffusers.eval import metrics as M
from hyperquant_diffusers.eval.lpips_backbone import ALEXNET_FILE, build_lpips_from_state_dict, load_lpips


def _frames(seed, shape=(5, 24, 20, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_psnr_and_mse_match_skimage_and_numpy():
    a, b = _frames(0), _frames(1)
    got = M.per_frame_psnr(a, b)
    want = [peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(a.shape[0])]
    np.testing.assert_array_equal(got, want)
    mse = M.per_frame_mse(a, b)
    want_mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    np.testing.assert_allclose(mse, want_mse, rtol=1e-12)
    # PSNR is the closed form of the MSE: 10 log10(255^2 / MSE)
    np.testing.assert_allclose(got, 10 * np.log10(255.0 ** 2 / want_mse), rtol=1e-12)
    # Two independent uniform frames: E[(x-y)^2] = 2 Var(U{0..255}) = (256^2-1)/6 -> about 7.7 dB
    assert abs(float(np.mean(got)) - 10 * math.log10(255 ** 2 * 6 / (256 ** 2 - 1))) < 0.15


def test_perturbed_video_gives_the_psnr_its_noise_implies():
    ref = np.full((9, 32, 32, 3), 128, dtype=np.uint8)
    rng = np.random.default_rng(3)
    # +-d on every value: MSE is exactly d^2, so PSNR = 20 log10(255 / d)
    for d in (1, 4, 16):
        test = (ref.astype(np.int16) + d * rng.choice([-1, 1], size=ref.shape)).astype(np.uint8)
        np.testing.assert_allclose(M.per_frame_psnr(ref, test), 20 * math.log10(255.0 / d), rtol=0, atol=1e-9)
    # Gaussian noise sigma, rounded to integers: MSE = sigma^2 + 1/12 (rounding) up to sampling error
    sigma = 3.0
    test = np.clip(np.round(ref + rng.normal(0, sigma, size=ref.shape)), 0, 255).astype(np.uint8)
    want = 10 * math.log10(255.0 ** 2 / (sigma ** 2 + 1 / 12))
    got = M.per_frame_psnr(ref, test)
    # 3072 samples/frame: Var(e^2) = 2 sigma^4, so the MSE's relative s.e. is sqrt(2/3072) = 2.6% -> 0.11 dB;
    # allow 4 s.e. per frame, and 4 s.e. / 3 for the PSNR of the MSE pooled over the 9 frames.
    assert np.all(np.abs(got - want) < 0.45), (got, want)
    assert abs(M.psnr_from_mse(float(np.mean(M.per_frame_mse(ref, test)))) - want) < 0.15


def test_identical_frames_infinite_psnr_and_json_representation():
    a = _frames(5)
    psnr = M.per_frame_psnr(a, a.copy())
    assert np.all(np.isinf(psnr)) and np.all(psnr > 0)
    assert np.all(M.per_frame_mse(a, a) == 0)
    assert M.psnr_from_mse(0.0) == math.inf
    encoded = [M.json_number(v) for v in psnr]
    assert encoded == ["inf"] * a.shape[0]
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: no Infinity literal
    assert [float(x) for x in json.loads(text)] == [math.inf] * a.shape[0]
    assert M.json_number(float("nan")) == "nan" and M.json_number(-math.inf) == "-inf" and M.json_number(2.5) == 2.5
    # one identical frame among others: mean is inf (honest), min is the finite worst frame
    b = a.copy()
    b[1] ^= 1
    s = M.summarize(M.per_frame_psnr(a, b))
    assert s["mean"] == math.inf and math.isfinite(s["min"])
    assert M.format_db(math.inf).startswith("∞")


def test_frames_mismatch_is_a_clear_error():
    with pytest.raises(M.FramesMismatchError, match=r"\(5, 24, 20, 3\).*\(4, 24, 20, 3\)"):
        M.per_frame_psnr(_frames(0), _frames(1, (4, 24, 20, 3)))
    with pytest.raises(M.FramesMismatchError, match="uint8"):
        M.per_frame_psnr(_frames(0).astype(np.float32), _frames(1).astype(np.float32))


def _random_alexnet_state(seed=0):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None).state_dict()


def _reference_lpips_with_trunk(monkeypatch, state):
    """lpips' OWN trunk-loading path: lpips.pretrained_networks calls torchvision's alexnet(pretrained=True);
    we hand it a model holding ``state`` instead of downloading ImageNet weights."""
    import lpips
    import lpips.pretrained_networks as pn
    import torchvision

    real_alexnet = torchvision.models.alexnet

    def fake_alexnet(pretrained=False, **kw):
        m = real_alexnet(weights=None)
        m.load_state_dict(state)
        return m

    monkeypatch.setattr(pn.tv, "alexnet", fake_alexnet)
    return lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=False, verbose=False).eval()


def test_lpips_plumbing_matches_direct_lpips_call(monkeypatch):
    """INJECTED random trunk (non-reference, labelled): checks layout/range/batching/weight loading only."""
    state = _random_alexnet_state(0)
    info = build_lpips_from_state_dict(state, "injected random test trunk", is_reference=False)
    assert info.available and info.to_json()["reference_backbone"] is False
    ref_model = _reference_lpips_with_trunk(monkeypatch, state)
    a, b = _frames(10, (5, 64, 64, 3)), _frames(11, (5, 64, 64, 3))
    ours = M.per_frame_lpips(info.model, a, b, batch=2)  # batch 2 over 5 frames: exercises a ragged last batch
    with torch.no_grad():
        ta = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255.0 * 2 - 1
        tb = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 255.0 * 2 - 1
        direct = ref_model(ta.float(), tb.float()).reshape(-1).double().numpy()
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-7)
    assert np.all(ours > 0)
    # identical frames: exactly 0
    assert np.all(M.per_frame_lpips(info.model, a, a.copy()) == 0.0)
    # 32x32 frames are enlarged x2 (nearest) before LPIPS: compare with lpips on repeat_interleave'd input
    s, t = _frames(12, (3, 32, 32, 3)), _frames(13, (3, 32, 32, 3))
    assert M.lpips_upsample_factor(32, 32) == 2 and M.lpips_upsample_factor(64, 80) == 1
    up = lambda x: (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1).repeat_interleave(2, 2).repeat_interleave(2, 3)  # noqa: E731
    with torch.no_grad():
        direct_small = ref_model(up(s), up(t)).reshape(-1).double().numpy()
    np.testing.assert_allclose(M.per_frame_lpips(info.model, s, t), direct_small, rtol=1e-5, atol=1e-7)


def test_lpips_backbone_resolution_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    off = load_lpips("off")
    assert not off.available and "disabled" in off.reason
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        load_lpips(str(tmp_path / "no-such.pth"))
    cold = load_lpips("auto", allow_download=False)
    assert not cold.available and ALEXNET_FILE in cold.reason
    assert cold.to_json()["available"] is False and cold.to_json()["unavailable_reason"]
    # a warm TORCH_HOME: a file under hub/checkpoints is found; its sha256 is not torchvision's, and it says so
    ckpt = tmp_path / "torch_home" / "hub" / "checkpoints" / ALEXNET_FILE
    ckpt.parent.mkdir(parents=True)
    torch.save(_random_alexnet_state(1), ckpt)
    warm = load_lpips("auto", allow_download=False)
    assert warm.available and "not the torchvision file" in warm.source and str(ckpt) in warm.source
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="features.0.weight"):
        load_lpips(str(bad))


def test_video_files_mp4_and_gif_fallback(tmp_path, monkeypatch):
    import imageio.v2 as imageio2
    import imageio.v3 as iio

    from hyperquant_diffusers.eval.video import load_frames_npy, save_frames_npy, to_uint8_frames, write_video

    # float (F, C, H, W) in [0, 1] -> uint8 (F, H, W, 3), rounded
    f = to_uint8_frames(torch.full((2, 3, 4, 5), 0.5))
    assert f.shape == (2, 4, 5, 3) and f.dtype == np.uint8 and np.all(f == 128)
    # few flat colours (exact in a GIF palette); odd size is padded to even for yuv420p
    frames = np.zeros((4, 17, 21, 3), dtype=np.uint8)
    for i in range(4):
        frames[i, :, : 10 + i] = (200, 30 * i, 60)
    mp4 = write_video(str(tmp_path / "a.mp4"), frames, fps=8)
    back = iio.imread(mp4)
    assert mp4.endswith(".mp4") and back.shape == (4, 18, 22, 3)
    assert np.abs(back[:, :17, :21].astype(int) - frames).mean() < 8  # lossy H.264, but the same picture
    # no usable ffmpeg -> GIF next to it, frames exact
    monkeypatch.setattr(imageio2, "get_writer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no ffmpeg")))
    gif = write_video(str(tmp_path / "b.mp4"), frames, fps=8)
    assert gif.endswith("b.gif") and not os.path.exists(tmp_path / "b.mp4")
    np.testing.assert_array_equal(np.asarray(iio.imread(gif, index=None))[..., :3], frames)
    save_frames_npy(str(tmp_path / "f.npy"), frames)
    np.testing.assert_array_equal(load_frames_npy(str(tmp_path / "f.npy")), frames)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no temp files left behind
