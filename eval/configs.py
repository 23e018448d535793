"""Evaluation configuration names -> ``HyperQuantConfig`` keyword arguments.

Grammar (case-insensitive, no spaces)::

    CONFIG   := "bf16" | WEIGHTS [ "+" KV ] | "bf16+" KV
    WEIGHTS  := "w" BITS "-" LATTICE            e.g. w4-e8, w3-d4, w2.5-e8, w6-z
    KV       := "kv" BITS [ "-" CORRECTION ]    e.g. kv4, kv4-dither, kv3-qjl, kv6-none
    BITS     := a number in [codec.MIN_BITS, codec.MAX_BITS]  ("2.5" or "2p5")
    LATTICE  := one of the codec's lattices (z, a2, d4, e8)
    CORRECTION := none | dither | qjl

``bf16`` is the unquantized baseline every other configuration is compared against.
``w4-e8`` quantizes the transformer and text-encoder linears at 4 bits per scalar on E8.
``+kv4`` additionally quantizes attention K/V at 4 bits per scalar (``kv_bits=4.0``) and caches the text
cross-attention K/V compressed (``cache_text_kv=True``); it needs ``hyperquant_diffusers.kv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re

from hyperquant_diffusers.codec.constants import LATTICES, MAX_BITS, MIN_BITS

BASELINE = "bf16"
KV_CORRECTIONS = ("none", "dither", "qjl")

GRAMMAR = (
    "config names: 'bf16' (baseline) | 'w<BITS>-<LATTICE>' | 'w<BITS>-<LATTICE>+kv<BITS>[-<CORRECTION>]' | "
    "'bf16+kv<BITS>[-<CORRECTION>]'; BITS in [%g, %g] (e.g. 4, 2.5 or 2p5), LATTICE in {%s}, CORRECTION in {%s}; "
    "examples: bf16, w4-e8, w3-d4, w6-e8, w4-e8+kv4, w4-e8+kv4-dither"
    % (MIN_BITS, MAX_BITS, ", ".join(k.lower() for k in LATTICES), ", ".join(KV_CORRECTIONS))
)

_NUM = r"(\d+(?:[.p]\d+)?)"
_W_RE = re.compile(r"^w" + _NUM + r"-([a-z0-9]+)$")
_KV_RE = re.compile(r"^kv" + _NUM + r"(?:-([a-z]+))?$")


class ConfigNameError(ValueError):
    """An evaluation configuration name that does not follow :data:`GRAMMAR`."""


@dataclass(frozen=True)
class EvalConfig:
    """One parsed configuration.

    ``weight_kwargs``: ``HyperQuantConfig`` kwargs for the linear weights (``{}`` when weights stay bf16).
    ``kv_kwargs``: ``HyperQuantConfig`` kwargs for the attention K/V path (``{}`` when off).
    ``bits_per_scalar``: nominal weight rate (16.0 for bf16 weights).
    """

    name: str
    weight_kwargs: dict = field(default_factory=dict)
    kv_kwargs: dict = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return not self.weight_kwargs and not self.kv_kwargs

    @property
    def quantizes_weights(self) -> bool:
        return bool(self.weight_kwargs)

    @property
    def uses_kv(self) -> bool:
        return bool(self.kv_kwargs)

    @property
    def bits_per_scalar(self) -> float:
        return float(self.weight_kwargs.get("bits", 16.0))

    @property
    def quant_kwargs(self) -> dict:
        """All ``HyperQuantConfig`` kwargs (weights + KV), what goes into ``PipelineQuantizationConfig``
        (``bits=None`` for bf16 weights with quantized K/V)."""
        weights = self.weight_kwargs if self.weight_kwargs else {"bits": None}
        return {**weights, **self.kv_kwargs}

    def to_json(self) -> dict:
        return {"name": self.name, "weight_kwargs": dict(self.weight_kwargs), "kv_kwargs": dict(self.kv_kwargs),
                "bits_per_scalar_nominal": self.bits_per_scalar}


def _bits(text: str, what: str, name: str) -> float:
    value = float(text.replace("p", "."))
    if not (MIN_BITS <= value <= MAX_BITS):
        raise ConfigNameError(f"config {name!r}: {what} bits {value:g} outside [{MIN_BITS:g}, {MAX_BITS:g}]. {GRAMMAR}")
    return value


def parse_config(name: str) -> EvalConfig:
    """Parse one config name (see module docstring); raise :class:`ConfigNameError` listing the grammar."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigNameError(f"empty config name. {GRAMMAR}")
    canon = name.strip().lower()
    parts = canon.split("+")
    if len(parts) > 2:
        raise ConfigNameError(f"unknown config {name!r}: at most one '+kv..' suffix. {GRAMMAR}")
    head = parts[0]
    weight_kwargs: dict = {}
    if head == BASELINE:
        pass
    else:
        m = _W_RE.match(head)
        if not m:
            raise ConfigNameError(f"unknown config {name!r}. {GRAMMAR}")
        lattice = m.group(2).upper()
        if lattice not in LATTICES:
            raise ConfigNameError(f"config {name!r}: unknown lattice {m.group(2)!r}. {GRAMMAR}")
        weight_kwargs = {"bits": _bits(m.group(1), "weight", name), "lattice": lattice}
    kv_kwargs: dict = {}
    if len(parts) == 2:
        m = _KV_RE.match(parts[1])
        if not m:
            raise ConfigNameError(f"unknown config {name!r}: bad KV part {parts[1]!r}. {GRAMMAR}")
        kv_kwargs = {"kv_bits": _bits(m.group(1), "KV", name), "cache_text_kv": True}
        if m.group(2) is not None:
            if m.group(2) not in KV_CORRECTIONS:
                raise ConfigNameError(f"config {name!r}: unknown KV bias correction {m.group(2)!r}. {GRAMMAR}")
            kv_kwargs["kv_bias_correction"] = m.group(2)
    return EvalConfig(name=canon, weight_kwargs=weight_kwargs, kv_kwargs=kv_kwargs)


def parse_config_list(text: str | list[str]) -> list[EvalConfig]:
    """Parse ``"bf16,w4-e8,..."`` (or a list). The baseline is always present and first; duplicates are an error."""
    names = [n for n in (text.split(",") if isinstance(text, str) else list(text))]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigNameError(f"no configs given. {GRAMMAR}")
    configs = [parse_config(n) for n in names]
    seen: set[str] = set()
    for c in configs:
        if c.name in seen:
            raise ConfigNameError(f"config {c.name!r} listed twice")
        seen.add(c.name)
    baseline = [c for c in configs if c.is_baseline]
    if not baseline:
        baseline = [parse_config(BASELINE)]
    return baseline + [c for c in configs if not c.is_baseline]
