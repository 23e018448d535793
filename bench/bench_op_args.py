"""Host cost of the compiled op's arguments: ``torch.ops.hyperquant.lattice_linear`` takes the layer's MMA type and
its resident tensors (``LatticeLinear.resident_tensors()``, 6-8 tensors) besides ``x``, ``op_id`` and
``out_features``, so that CUDA graphs and Dynamo's guards see a layer change. This times the dispatcher alone: ops
of both schemas in a scratch namespace, registered as the real op is (``torch.library.Library``,
CompositeExplicitAutograd), whose kernel only allocates the output. CPU only; µs per call, median of 7 runs.

    python bench/bench_op_args.py
"""

from __future__ import annotations

import time

import torch


def _per_call_us(fn, n: int = 20000) -> float:
    for _ in range(1000):
        fn()
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    runs.sort()
    return round(runs[3], 2)


def main() -> dict:
    lib = torch.library.Library("hyperquant_bench_op_args", "DEF")
    lib.define("with_state(Tensor x, Tensor op_id, int out_features, str mma, Tensor[] state) -> Tensor")
    lib.define("without_state(Tensor x, Tensor op_id, int out_features) -> Tensor")

    def kernel(x, op_id, out_features, mma=None, state=None):
        return x.new_empty((x.shape[0], out_features))

    lib.impl("with_state", kernel, "CompositeExplicitAutograd")
    lib.impl("without_state", kernel, "CompositeExplicitAutograd")
    ops = torch.ops.hyperquant_bench_op_args
    x, op_id = torch.randn(4, 8), torch.tensor([1])
    state = [torch.zeros(16) for _ in range(8)]
    res = {"torch": torch.__version__,
           "kernel_alone": _per_call_us(lambda: kernel(x, op_id, 8, "int8", state)),
           "x_op_id_out_features": _per_call_us(lambda: ops.without_state.default(x, op_id, 8))}
    for k in (0, 6, 8):
        st = state[:k]
        res[f"plus_mma_and_{k}_state_tensors"] = _per_call_us(lambda: ops.with_state.default(x, op_id, 8, "int8", st))
    for name, v in res.items():
        print(f"{name}: {v}" + (" us" if name != "torch" else ""))
    return res


if __name__ == "__main__":
    main()
