"""Atomic saving: write a whole pipeline/model folder next to the target, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile


def save_pretrained_atomic(obj, save_directory: str, **kwargs) -> str:
    """``obj.save_pretrained`` into a temporary sibling folder, then rename it to ``save_directory``.

    A crash or full disk mid-save leaves no half-written checkpoint at ``save_directory`` (diffusers and
    transformers write their files in place). An existing ``save_directory`` is replaced only after the new one is
    complete. Returns ``save_directory``.
    """
    save_directory = os.path.abspath(str(save_directory))
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hq-tmp-", dir=parent)
    try:
        obj.save_pretrained(tmp, **kwargs)
        old = None
        if os.path.exists(save_directory):
            old = tempfile.mkdtemp(prefix=".hq-old-", dir=parent)
            os.rmdir(old)
            os.rename(save_directory, old)
        os.rename(tmp, save_directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_directory
