"""Tensors that the kernels' caches keep from call to call, allocated outside every CUDA-graph memory pool.

``torch.compile(mode="reduce-overhead")`` runs its warm-up calls with every CUDA allocation of the calling thread
routed into the private pool of its CUDA graphs (``torch._inductor.cudagraph_trees``), and then rejects any live
tensor of that pool it does not track as a graph output ("tensor(s) in the cudagraph pool not tracked"). The caches
the kernels fill on a layer's first calls (decode scratch rows and slots, the RHT product operand, the decoded-code
scales, the rank tables) are such tensors when that first call is a warm-up call: a model compiled before it ever
ran eagerly, or a stream (the warm-up's own, or the prefetch's) first used there.

The routing is per thread, so :func:`outside_graph_pools` builds a cache entry on one dedicated worker thread, on
the caller's device and current stream: its allocations come from the ordinary caching allocator, associated with
the stream that uses them, and its kernels stay in order with the caller's work. It costs a thread hand-off
(tens of microseconds), once per cache entry. Inside a CUDA-graph capture it refuses: a kernel the worker launched
would be recorded into the graph, not run, and the callers handle a capture before they reach a cache (a graph
temporary, or a named error asking for an eager call first).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import torch

_WORKER: dict = {}
_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_WORKER.clear)   # a forked child has no worker thread: it starts its own


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    ex = _WORKER.get("ex")
    if ex is None:
        with _LOCK:
            ex = _WORKER.get("ex")
            if ex is None:
                ex = _WORKER["ex"] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="hyperquant-cache", initializer=_mark_worker)
    return ex


def _mark_worker() -> None:
    _WORKER["thread"] = threading.get_ident()


def outside_graph_pools(device, fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)``, with the CUDA tensors it allocates taken outside any CUDA graph's memory pool.

    ``device``: the device the entry is for (a ``torch.device`` or string); for a non-CUDA device ``fn`` simply
    runs here. On CUDA it runs on a worker thread with ``device`` current and the caller's current stream of that
    device as its stream; exceptions propagate. Raises ``RuntimeError`` if the caller's stream is capturing a CUDA
    graph (see the module docstring).
    """
    device = torch.device(device)
    if device.type != "cuda" or threading.get_ident() == _WORKER.get("thread"):
        return fn(*args, **kwargs)
    with torch.cuda.device(device):   # the capture state of that device's current stream, not the current device's
        stream = torch.cuda.current_stream()
        capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        raise RuntimeError(
            "HyperQuant: a kernel cache would be built while a CUDA graph is being captured; run the model once "
            "outside the capture first (torch.compile's mode=\"reduce-overhead\" does its warm-up runs first; with "
            "torch.cuda.graph, call the model once before the capture)")

    def job():
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            return fn(*args, **kwargs)

    return _executor().submit(job).result()
