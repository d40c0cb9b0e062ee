"""Ahead-of-time compile check of the Triton kernels, for machines without a GPU.

``python -m imp_fast.backends.triton.aot [--arch 90]`` compiles every kernel of the
backend (Picard fused/split, Anderson history/solve/mix/commit, the probes' pair ratios;
float32, float16, bfloat16, and float64 for the pair ratios) to PTX and cubin for a CUDA
target with Triton's bundled ptxas, without a GPU. It
catches what the interpreter tolerates but the compiler rejects (types, masks,
constexpr branches). Must run with TRITON_INTERPRET unset (the interpreter replaces
the kernels); exits 1 when a kernel fails to compile.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

__all__ = ["compile_all"]

_PTR64 = ("part_ptr",)
_PTR32 = ("ws_ptr", "snap_best_ptr", "abs_ptr", "rel_ptr", "abs0_ptr", "best_abs_ptr",
          "best_rel_ptr", "best_res_ptr", "H_ptr", "coef_ptr", "dnorm_ptr", "out_ptr")


def _variants():
    from . import anderson as A
    from . import picard as P
    from . import probes as R

    for fused in (True, False):
        yield P._picard_update_kernel, dict(FUSED=fused, STOP_REL=True, BEST=True, DAMP=True, BLOCK=1024, CP=4), f"picard_update(fused={fused})"
    yield P._picard_partial_kernel, dict(BEST=True, DAMP=True, BLOCK=1024), "picard_partial"
    yield A._anderson_history_kernel, dict(M=5, MP=8, K=8, BLOCK=512, DAMP=True), "anderson_history"
    yield A._anderson_solve_kernel, dict(STOP_REL=False, BEST=True, M=5, MP=8, K=8, KP=8, CP=4), "anderson_solve"
    for commit in (True, False):
        yield A._anderson_mix_kernel, dict(HAS_DAMP=True, BEST=True, COMMIT=commit, M=5, MP=8, BLOCK=512), f"anderson_mix(commit={commit})"
    yield A._anderson_commit_kernel, dict(HAS_DAMP=True, BLOCK=512, CP=4), "anderson_commit"
    yield R._pair_ratios_kernel, dict(IS_F64=False, BLOCK=1024), "pair_ratios"


def _compile(triton, ASTSource, target, fn, consts, types):
    names = list(inspect.signature(fn.fn).parameters)
    sig, cst = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            cst[(i,)] = consts[n]
        else:
            sig[n] = types.get(n, "i32")
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=target,
                           options={"num_warps": 4})
        return None if k.asm.get("cubin") else "no cubin produced"
    except Exception as exc:  # report every failure, not just the first
        return f"{type(exc).__name__}: {exc}"


def compile_all(arch: int = 90, dtypes=("fp32", "fp16", "bf16")):
    """Compile each kernel variant for sm_<arch>; returns [(name, error or None)]."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (run it in a fresh process)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    out = []
    for dt in dtypes:
        types = {n: f"*{dt}" for n in ("z_ptr", "fz_ptr", "best_z_ptr", "F_ptr", "G_ptr", "y_ptr")}
        types.update({n: "*fp32" for n in _PTR32})
        types.update({n: "*fp64" for n in _PTR64})
        types.update(status_ptr="*i8", n_iter_ptr="*i32", snap_status_ptr="*i32", mode_ptr="*i32", mbad_ptr="*i32")
        types.update({n: "fp32" for n in ("tol", "beta", "divergence", "eps", "lam", "damp")})
        for fn, consts, name in _variants():
            err = _compile(triton, ASTSource, target, fn, consts, types)
            out.append((f"{name}[{dt}]", err))
    # float64 storage runs in the pair-ratios kernel (the steps run the reference there)
    from . import probes as R

    types = {"y_ptr": "*fp64", "dnorm_ptr": "*fp64", "out_ptr": "*fp64", "status_ptr": "*i8"}
    out.append(("pair_ratios[fp64]", _compile(triton, ASTSource, target, R._pair_ratios_kernel,
                                              dict(IS_F64=True, BLOCK=1024), types)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile the Triton kernels for a CUDA target without a GPU")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    results = compile_all(args.arch)
    for name, err in results:
        print(f"{name}: {'ok' if err is None else 'FAILED ' + err}")
    return 1 if any(err for _, err in results) else 0


if __name__ == "__main__":
    sys.exit(main())
