"""Split (prompt, seed) jobs across processes and merge their shard files (accelerate's ``PartialState``).

Each process writes ``shards/rank<r>-of-<n>.json`` (atomically) under the shared output folder; rank 0 waits for
all ``n`` shard files of the same run (matched by ``run_fingerprint``) and merges them. Rank 0 waits on the
file system rather than in a collective so that ranks with long shards never trip a collective timeout; if a
rank crashes, ``accelerate launch`` (torchrun) stops the others.
"""

from __future__ import annotations

import os
import time

from .store import read_json, write_json_atomic


def shard_path(out: str, rank: int, world: int) -> str:
    return os.path.join(out, "shards", f"rank{rank}-of-{world}.json")


def split_jobs(state, jobs: list) -> list:
    """This process's contiguous share of ``jobs`` (``PartialState.split_between_processes``, no padding)."""
    with state.split_between_processes(list(jobs)) as mine:
        return list(mine)


def clear_own_shard(out: str, rank: int, world: int) -> None:
    p = shard_path(out, rank, world)
    if os.path.exists(p):
        os.unlink(p)


def write_shard(out: str, rank: int, world: int, run_fp: str, record: dict) -> str:
    p = shard_path(out, rank, world)
    write_json_atomic(p, {"run_fingerprint": run_fp, "rank": rank, "world": world, **record})
    return p


def wait_for_shards(out: str, world: int, run_fp: str, poll_s: float = 1.0, timeout_s: float | None = None,
                    log=print) -> list[dict]:
    """Rank 0: block until every rank's shard of this run exists; returns them in rank order."""
    t0, announced = time.monotonic(), False
    while True:
        shards, missing = [], []
        for r in range(world):
            p = shard_path(out, r, world)
            rec = None
            if os.path.isfile(p):
                try:
                    rec = read_json(p)
                except (OSError, ValueError):
                    rec = None
            if rec is None or rec.get("run_fingerprint") != run_fp:
                missing.append(r)
            else:
                shards.append(rec)
        if not missing:
            return shards
        if not announced:
            log(f"waiting for shards of rank(s) {missing} ...")
            announced = True
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"shards of rank(s) {missing} did not appear under {out}/shards within {timeout_s}s")
        time.sleep(poll_s)
