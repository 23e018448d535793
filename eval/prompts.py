"""Prompt lists: one prompt per line; blank lines and lines starting with ``#`` are ignored."""

from __future__ import annotations

import os

from .store import prompt_id

#: The default prompt list, shipped in the repository's ``samples/`` folder.
DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "prompts.txt")
#: Used when samples/prompts.txt is not next to the installed package (e.g. a non-editable install).
FALLBACK_PROMPTS = (
    "a robot dancing in the city at night",
    "a red car moving fast on the street",
    "a bird flying over the blue sea",
)


def read_prompts(path: str | None) -> list[dict]:
    """``[{"id", "text"}]`` from a prompt file (``None``: the default list). Clear errors for a missing file,
    an empty list or duplicate prompts."""
    if path is None:
        if os.path.isfile(DEFAULT_PROMPTS):
            path = DEFAULT_PROMPTS
        else:
            return [{"id": prompt_id(i, t), "text": t} for i, t in enumerate(FALLBACK_PROMPTS)]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (one prompt per line, '#' comments)")
    with open(path, encoding="utf-8") as f:
        texts = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
    if not texts:
        raise ValueError(f"prompt file {path!r} has no prompts (one per line; blank and '#' lines are skipped)")
    dup = sorted({t for t in texts if texts.count(t) > 1})
    if dup:
        raise ValueError(f"prompt file {path!r} lists the same prompt more than once: {dup[0]!r}")
    return [{"id": prompt_id(i, t), "text": t} for i, t in enumerate(texts)]
