"""Build an ``lpips.LPIPS(net="alex")`` model offline, or say why LPIPS is unavailable.

The ``lpips`` package ships its linear heads, but its AlexNet trunk comes from torchvision's ImageNet weights
(``alexnet-owt-7be5be79.pth``), normally downloaded on first use. Order of resolution for ``spec``:

* a file path: a torchvision AlexNet state dict (``features.N.weight`` keys) — used as is;
* ``"auto"`` (default): ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` if present (a warm cache),
  else one download attempt through torch.hub (what happens on users' machines) with a short timeout;
* ``"off"``: LPIPS is left out.

When none works, :func:`load_lpips` returns an unavailable :class:`LpipsInfo` with the reason, and the report
prints it. A randomly initialized trunk is never used for reported numbers; tests may inject a trunk through
:func:`build_lpips_from_state_dict` with a label that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
import socket

from .store import file_sha256

#: torchvision's AlexNet ImageNet weights (``AlexNet_Weights.IMAGENET1K_V1``); the 8 hex digits are the start
#: of the file's sha256 (torch.hub's convention).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
ALEXNET_SHA256_PREFIX = "7be5be79"
#: Indices of AlexNet's conv layers inside ``features`` and the lpips slice each belongs to
#: (lpips.pretrained_networks.alexnet: slice1 = features[0:2], slice2 = [2:5], slice3 = [5:8], 4 = [8:10], 5 = [10:12]).
ALEX_CONVS = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass
class LpipsInfo:
    """Outcome of LPIPS setup. ``model`` is an ``lpips.LPIPS`` or ``None``; ``source`` says where the AlexNet
    trunk came from; ``reason`` why LPIPS is unavailable; ``is_reference`` is False for injected test trunks."""

    model: object | None
    source: str
    reason: str = ""
    sha256: str | None = None
    is_reference: bool = True

    @property
    def available(self) -> bool:
        return self.model is not None

    def to_json(self) -> dict:
        return {"available": self.available, "net": "alex", "lpips_version": "0.1", "backbone_source": self.source,
                "backbone_sha256": self.sha256, "reference_backbone": self.is_reference,
                "unavailable_reason": self.reason or None}


def build_lpips_from_state_dict(state_dict: dict, source: str, *, is_reference: bool = True, sha256: str | None = None):
    """An ``lpips.LPIPS(net="alex", version="0.1")`` whose trunk holds ``state_dict`` (torchvision AlexNet keys).

    The linear heads are lpips' own calibrated weights (shipped in the package, no network). Raises
    ``ValueError`` naming missing or misshapen keys.
    """
    import lpips
    import torch

    model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    with torch.no_grad():
        for idx, slice_no in ALEX_CONVS.items():
            conv = getattr(model.net, f"slice{slice_no}")._modules[str(idx)]
            for pname in ("weight", "bias"):
                key = f"features.{idx}.{pname}"
                if key not in state_dict:
                    raise ValueError(f"LPIPS backbone from {source}: missing {key!r} (expected a torchvision AlexNet "
                                     f"state dict such as {ALEXNET_FILE})")
                src = state_dict[key]
                dst = getattr(conv, pname)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"LPIPS backbone from {source}: {key!r} has shape {tuple(src.shape)}, "
                                     f"AlexNet needs {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))
    model.eval()
    return LpipsInfo(model=model, source=source, sha256=sha256, is_reference=is_reference)


def _load_file(path: str, label: str) -> LpipsInfo:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    digest = file_sha256(path)
    verified = digest.startswith(ALEXNET_SHA256_PREFIX)
    source = f"{label} {path} ({'torchvision IMAGENET1K_V1, sha256 verified' if verified else 'sha256 ' + digest[:12] + ', not the torchvision file'})"
    return build_lpips_from_state_dict(state, source, sha256=digest)


def hub_checkpoint_path() -> str:
    """Where torch.hub keeps (or would keep) the AlexNet weights: ``$TORCH_HOME/hub/checkpoints/...``."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_FILE)


def load_lpips(spec: str | None = "auto", *, allow_download: bool = True) -> LpipsInfo:
    """Resolve the AlexNet trunk per the module docstring. Raises ``FileNotFoundError`` for an explicit path
    that does not exist (the user asked for it); otherwise never raises — an unavailable result says why."""
    spec = "auto" if spec in (None, "") else spec
    if spec == "off":
        return LpipsInfo(None, "none", reason="LPIPS disabled (--lpips-backbone off)")
    if spec != "auto":
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--lpips-backbone {spec!r}: no such file (expected torchvision's {ALEXNET_FILE})")
        return _load_file(spec, "file")
    cached = hub_checkpoint_path()
    if os.path.isfile(cached):
        return _load_file(cached, "torch hub cache")
    if not allow_download:
        return LpipsInfo(None, "none", reason=f"no AlexNet weights at {cached} and downloading is off; pass "
                         f"--lpips-backbone PATH to torchvision's {ALEXNET_FILE} or set TORCH_HOME to a warm cache")
    import torch

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(ALEXNET_URL, progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, hash mismatch: all mean "no trustworthy backbone"
        return LpipsInfo(None, "none", reason=(
            f"AlexNet weights for LPIPS are not cached at {cached} and could not be downloaded "
            f"({type(exc).__name__}: {str(exc)[:160]}); pass --lpips-backbone PATH to torchvision's {ALEXNET_FILE} "
            "or set TORCH_HOME to a warm cache. LPIPS is left out rather than computed with a random backbone."))
    finally:
        socket.setdefaulttimeout(old)
    return _load_file(cached, "downloaded to")
