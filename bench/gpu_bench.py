#!/usr/bin/env python
"""GPU benchmark of the imp_fast backends: correctness, host syncs, ms/iteration, bandwidth.

    python bench/gpu_bench.py [--quick] [--out bench/RESULTS-gpu.md]

On a CUDA machine, for each problem size (B, D):

* checks every backend (reference, cpp when built with CUDA, triton, triton+graph)
  against the reference solve (same statuses and n_iter, z within tolerance);
* asserts the loop makes no host sync with check_every=None
  (``torch.cuda.set_sync_debug_mode("error")`` around the solve);
* times ms per iteration (one f evaluation + one fused step) with CUDA events for
  reference, cpp (CUDA), triton, triton+graph and torchdeq's ``anderson_solver`` (when
  importable; run with tol=0 so it does all max_iter iterations, it syncs to check);
* measures the achieved bandwidth of the fused Triton Anderson step (its kernels
  alone) against a device-to-device copy;
* runs the Lipschitz probe (``lipschitz_trace``, 64 inputs x 8 directions stacked,
  D = 4096, rank-16 G, 40 steps) on every backend: ratios against the reference
  backend's (1e-5 relative), no host sync inside the probe loop (the syncs of a
  40-step probe equal those of a 5-step one), and time over the bare loop of G.

f(z) = tanh(z @ W.T + x) with a dense W (spectral scale 0.6) for D <= 4096; for
D = 65536 W is low rank (W = U V^T, rank 64, so f costs two thin matmuls) so that f does
not dominate the step. Prints a markdown table and writes it to ``--out``.
Without CUDA it prints why and exits with status 0 without benchmarking.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two smallest sizes, fewer repeats")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS-gpu.md"), help="markdown output file")
    ap.add_argument("--max-iter", type=int, default=30, help="iterations per timed solve")
    ap.add_argument("--m", type=int, default=5, help="Anderson history size")
    return ap.parse_args()


SIZES = [(8, 256), (64, 4096), (256, 65536)]
LOW_RANK = 64


def make_f(B, D, device, seed=0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, D, generator=gen).to(device)
    if D <= 4096:
        W = (torch.randn(D, D, generator=gen) * (0.6 / D**0.5)).to(device)

        def f(z):
            return torch.tanh(z @ W.T + x)

        return f, "tanh(zW^T+x), dense W"
    U = (torch.randn(D, LOW_RANK, generator=gen) / LOW_RANK**0.5).to(device)
    V = (torch.randn(D, LOW_RANK, generator=gen) * (0.6 / D**0.5)).to(device)

    def f(z):
        return torch.tanh((z @ V) @ U.T + x)

    return f, f"tanh(zVU^T+x), rank-{LOW_RANK} W"


def cuda_time(fn, repeats, warmup=1):
    """Median wall time of fn() in ms, by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 28):
    """Device-to-device copy bandwidth in GB/s (read + write bytes)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), repeats=20, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def anderson_step_bytes(B, D, m, elem, beta):
    """Bytes the 3 Triton Anderson kernels move per step (history tiles dominate)."""
    k1 = B * D * elem * (2 + 2 + (m - 1))  # read z, fz; write F, G slot; read other G slots
    k3 = B * D * elem * (1 + m + (m if beta != 1.0 else 0) + 1)  # read z, F (and G); write z
    small = B * (m * m * 4 * 2 + (m + 2) * 4 * 4)  # H row/col, partial sums, weights
    return k1 + k3 + small


def fused_step_bandwidth(B, D, m, repeats):
    import torch

    from imp_fast.backends.triton import launch_anderson
    from imp_fast.state import LoopState, StepParams

    p = StepParams(tol=1e-30, beta=0.9, stop_rel=False, divergence=1e6, eps=1e-9, lam=1e-4)
    z = torch.randn(B, D, device="cuda")
    st = LoopState.create(z, m=m, return_best=False)
    fzs = [torch.randn(B, D, device="cuda") for _ in range(m)]
    for k in range(m):  # fill the history: every slot set, every sample running
        launch_anderson(st, fzs[k], p, k)
    state = {"k": 0}

    def step():
        k = state["k"]
        launch_anderson(st, fzs[k % m], p, k % m)
        state["k"] = k + 1

    ms = cuda_time(step, repeats=repeats, warmup=2)
    nbytes = anderson_step_bytes(B, D, m, 4, p.beta)
    return ms, nbytes / (ms * 1e-3) / 1e9


def check_sync_free(run):
    """None when run() makes no host sync, else the error text."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def probe_rows(backends, repeats):
    """Lipschitz probe on each backend at (64 x 9, 4096), rank-16 G, 40 steps: check
    against the reference backend, sync-free loop, time / bare G loop. Returns
    (rows, failures)."""
    import warnings

    import torch
    import imp_fast

    B, P, D, R, T = 64, 8, 4096, 16, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    U = torch.randn(D, R, device="cuda", generator=g) / D ** 0.5
    V = torch.randn(R, D, device="cuda", generator=g) / R ** 0.5
    V *= 0.9 / torch.linalg.matrix_norm(U @ V, ord=2)
    x = torch.randn(B, D, device="cuda", generator=g)
    d = torch.randn(P, D, device="cuda", generator=g)
    d /= d.norm(dim=1, keepdim=True)

    def G(z, xx):
        return torch.tanh(torch.addmm(xx, z @ U, V))

    xs = torch.cat([x, (x.unsqueeze(0) + 0.05 * d.unsqueeze(1)).reshape(P * B, D)])

    def bare():
        y = torch.zeros_like(xs)
        for _ in range(T):
            y = G(y, xs)
        return y

    bare_ms = cuda_time(bare, repeats=repeats)
    rows, failures = [("bare G loop", "-", "-", bare_ms, 1.0, "-", "-")], []
    for method in ("picard", "anderson"):
        ref = None
        for name in [b for b in backends if b != "triton+graph"]:
            def run(t_max=T, name=name, method=method):
                return imp_fast.lipschitz_trace(G, x, directions=d, eps=0.05, t_max=t_max, method=method,
                                                backend=name)

            tr = run()
            if ref is None:
                ref = tr
            ok = bool(torch.allclose(tr.ratios, ref.ratios, rtol=1e-5, atol=1e-6))
            check = "ok" if ok else f"MISMATCH (max diff {float((tr.ratios - ref.ratios).abs().max()):.3g})"

            def syncs(t_max, run=run):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        run(t_max)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                return sum("synchroniz" in str(m.message) for m in w)

            free = syncs(T) == syncs(5)
            if not ok:
                failures.append(f"probe {method} on {name}: {check}")
            if not free:
                failures.append(f"probe {method} on {name}: host syncs grow with t_max")
            ms = cuda_time(run, repeats=repeats)
            rows.append((f"lipschitz_trace {method}", name, method, ms, ms / bare_ms, check, "yes" if free else "NO"))
    return rows, failures


def main():
    args = _parse()
    try:
        import torch
    except ImportError:
        print("gpu_bench: torch is not installed; nothing to benchmark.")
        return 0
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device available (torch.cuda.is_available() is False); "
              "this benchmark needs a GPU. Nothing was benchmarked.")
        return 0

    import imp_fast
    from imp_fast.backends import backend_status, get_backend
    from imp_fast.graph import clear_graph_cache, solve_graphed

    dev = torch.device("cuda")
    status = backend_status()
    backends = ["reference"]
    notes = []
    if status.get("cpp") is None:
        try:
            get_backend("cpp", dev)
            backends.append("cpp")
        except Exception as exc:
            notes.append(f"cpp skipped: {exc}")
    else:
        notes.append(f"cpp skipped: {status['cpp']}")
    if status.get("triton") is None:
        backends += ["triton", "triton+graph"]
    else:
        notes.append(f"triton skipped: {status['triton']}")
    try:
        from torchdeq.solver import anderson_solver
    except Exception as exc:  # optional comparison
        anderson_solver = None
        notes.append(f"torchdeq skipped: {type(exc).__name__}: {exc}")

    sizes = SIZES[:2] if args.quick else SIZES
    repeats = 3 if args.quick else 10
    T, m = args.max_iter, args.m
    opts = dict(method="anderson", max_iter=T, tol=1e-6, m=m, beta=1.0, lam=1e-4, check_every=None)
    rows = []
    failures = []
    bw_rows = []
    copy_bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(dev)
    for B, D in sizes:
        f, fdesc = make_f(B, D, dev)
        z0 = torch.zeros(B, D, device=dev)
        ref = imp_fast.solve(f, z0, backend="reference", **opts)
        f_ms = cuda_time(lambda: f(z0), repeats=repeats * 3)

        def runner(name):
            if name == "triton+graph":
                return lambda: solve_graphed(f, z0, backend="triton", **opts)
            return lambda: imp_fast.solve(f, z0, backend=name, **opts)

        ref_ms = None
        for name in backends:
            run = runner(name)
            res = run()  # compile / capture
            torch.cuda.synchronize()
            same_status = bool(torch.equal(res.status, ref.status))
            dn = int((res.n_iter - ref.n_iter).abs().max())
            close = bool(torch.allclose(res.z, ref.z, rtol=1e-4, atol=1e-4))
            if same_status and dn == 0 and close:
                check = "ok"
            elif same_status and dn <= 1 and bool(torch.allclose(res.z, ref.z, rtol=1e-3, atol=1e-3)):
                check = "ok (n_iter within 1, z within 1e-3)"
            else:
                check = f"MISMATCH (same status={same_status}, max n_iter diff={dn}, z close={close})"
            if not check.startswith("ok"):
                failures.append(f"{name} at B={B}, D={D}: {check}")
            sync = check_sync_free(run)
            if sync is not None:
                failures.append(f"{name} at B={B}, D={D}: host sync in loop: {sync}")
            ms = cuda_time(run, repeats=repeats) / T
            if name == "reference":
                ref_ms = ms
            rows.append((B, D, fdesc, name, ms, ref_ms / ms, check, "yes" if sync is None else "NO"))
        if anderson_solver is not None:
            def tdeq():
                return anderson_solver(f, z0, max_iter=T, tol=0.0, m=m, lam=1e-4, stop_mode="abs")

            try:
                tdeq()
                ms = cuda_time(tdeq, repeats=repeats) / T
                rows.append((B, D, fdesc, "torchdeq anderson_solver", ms, ref_ms / ms, "-", "no (checks on host)"))
            except Exception as exc:
                notes.append(f"torchdeq failed at B={B}, D={D}: {type(exc).__name__}: {exc}")
        rows.append((B, D, fdesc, "f alone", f_ms, float("nan"), "-", "-"))
        if "triton" in backends:
            step_ms, gbs = fused_step_bandwidth(B, D, m, repeats=repeats * 5)
            bw_rows.append((B, D, m, step_ms, gbs, gbs / copy_bw))
        clear_graph_cache()
        del f

    lines = [
        f"# imp_fast GPU benchmark ({props.name}, torch {torch.__version__})",
        "",
        f"Anderson (m={m}, beta=1, lam=1e-4), float32, {T} iterations per solve with "
        "check_every=None; ms/iter = solve time / iterations (f + fused step), median of "
        f"{repeats} runs (CUDA events). `x ref` = speed-up over the reference backend.",
        "",
        "| B | D | f | backend | ms/iter | x ref | vs reference | sync-free loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for B, D, fdesc, name, ms, sp, check, sync in rows:
        spd = "-" if sp != sp else f"{sp:.2f}"
        lines.append(f"| {B} | {D} | {fdesc} | {name} | {ms:.4f} | {spd} | {check} | {sync} |")
    if bw_rows:
        lines += [
            "",
            f"Fused Triton Anderson step alone (its kernels only, float32, beta=0.9 so G is read in the mix); "
            f"device-to-device copy bandwidth {copy_bw:.0f} GB/s (read+write).",
            "",
            "| B | D | m | ms/step | GB/s | fraction of copy bandwidth |",
            "|---|---|---|---|---|---|",
        ]
        for B, D, mm, ms, gbs, frac in bw_rows:
            lines.append(f"| {B} | {D} | {mm} | {ms:.4f} | {gbs:.0f} | {frac:.2f} |")
    p_rows, p_fail = probe_rows(backends, repeats)
    failures += p_fail
    lines += [
        "",
        "Lipschitz probe: 64 inputs x 8 directions stacked (576 rows), D = 4096, rank-16 G, 40 steps; "
        "ratios checked against the reference backend's; time / bare loop of 40 G evaluations.",
        "",
        "| run | backend | method | ms | / bare G loop | vs reference | sync-free loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, name, method, ms, ratio, check, free in p_rows:
        lines.append(f"| {what} | {name} | {method} | {ms:.2f} | {ratio:.2f}x | {check} | {free} |")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if failures:
        lines += ["", "FAILURES:"] + [f"- {x}" for x in failures]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"written to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
