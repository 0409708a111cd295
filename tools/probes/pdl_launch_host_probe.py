"""Host time of one programmatic-dependent launch's Python side (jit._launch_pdl: the argument block and the
launch configuration handed to cuLaunchKernelEx), with the driver call replaced by a no-op: what the engine's thread
spends per PDL launch besides the driver itself. Runs on any CPU (no GPU needed); an eager prefill step makes about
four such launches a layer (rms_norm twice, rope_kv_append, the activation), a graph replay none.

    PYTHONPATH=. python3 tools/probes/pdl_launch_host_probe.py
"""
from __future__ import annotations

import time
import timeit

from flashgen.ops import jit


class _NoDriver:
    def cuLaunchKernelEx(self, cfg, fn, params, extra):  # noqa: N802 - the driver's name
        return 0


class _Kernel:
    class kernel:
        ptr = 1


def main() -> None:
    jit._driver = lambda: _NoDriver()
    args = tuple([jit.ptr(None)] * 8 + [jit.i32(5)] * 6 + [jit.f32(1.0)] * 2)
    n = 20000
    for grid in ((132,), (4096, 8)):
        t = min(timeit.repeat(lambda g=grid: jit._launch_pdl(_Kernel, g, (256,), args, 0, 0), number=n,
                              repeat=5)) / n
        print(f"_launch_pdl, 16 arguments, grid {grid}: {t * 1e6:.2f} us a launch (best of 5 x {n:,})")
    grids = [(g,) for g in range(1, 2001)]  # a new shape at every launch: each configuration made afresh
    best = float("inf")
    for _ in range(3):
        if hasattr(jit, "_launch_cache"):  # trees before the structures were reused have no cache
            jit._launch_cache()[1].clear()
        t0 = time.perf_counter()
        for g in grids:
            jit._launch_pdl(_Kernel, g, (256,), args, 0, 0)
        best = min(best, (time.perf_counter() - t0) / len(grids))
    print(f"_launch_pdl, 16 arguments, a new grid each launch: {best * 1e6:.2f} us a launch")


if __name__ == "__main__":
    main()
