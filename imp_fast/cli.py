"""The ``imp-fast`` command line: ``info``, ``demo`` and ``reproduce``."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional

import torch

from . import __version__

# Each reproducible case study lives in its own module exposing
# add_arguments(parser) and run(args) -> int.
REPRODUCERS = {
    "deblur": "imp_fast.models.deblur",
    "navier-stokes": "imp_fast.models.navier_stokes",
    "lp": "imp_fast.models.lp",
    "looped-transformer": "imp_fast.models.looped_transformer",
}


def _info(_: argparse.Namespace) -> int:
    from .backends import backend_status

    print(f"imp_fast {__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (threads: {torch.get_num_threads()})")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except Exception as exc:
        print(f"triton   not importable ({type(exc).__name__})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device   cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("device   cpu only (no CUDA device visible to torch)")
    print("backends:")
    for name, why in backend_status().items():
        print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"imp_fast demo: f(z) = tanh(W z + x), W symmetric with ||W||_2 = 0.97, batch {args.batch}, dim {args.dim}, "
          f"tol {args.tol:g} (rel), device {device}, {args.threads} thread(s)")
    rows = run_demo(args.batch, args.dim, max_iter=args.max_iter, tol=args.tol, repeats=args.repeats,
                    device=device, include_torchdeq=not args.no_torchdeq)
    print(format_table(rows))
    bad = [r for r in rows if r["solver"].startswith("imp_fast") and r["converged"] < args.batch]
    if bad:
        print(f"warning: {len(bad)} imp_fast row(s) did not converge for every sample", file=sys.stderr)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    return args.runner(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imp-fast", description="Fast batched fixed-point solves for implicit models.")
    p.add_argument("--version", action="version", version=f"imp_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends").set_defaults(func=_info)
    d = sub.add_parser("demo", help="solve the built-in DEQ problem with every backend and compare timings")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--dim", type=int, default=256)
    d.add_argument("--max-iter", type=int, default=500)
    d.add_argument("--tol", type=float, default=1e-5)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--no-torchdeq", action="store_true", help="skip the torchdeq baseline rows")
    d.set_defaults(func=_demo)
    r = sub.add_parser("reproduce", help="train and evaluate one of the paper's case studies")
    rsub = r.add_subparsers(dest="case", required=True)
    for name, module in REPRODUCERS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue  # case study not installed in this build
        cp = rsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(cp)
        cp.set_defaults(func=_reproduce, runner=mod.run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
