"""The ``imp-fast`` command line: ``info``, ``demo`` and ``reproduce``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import platform
import sys
from pathlib import Path
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


# ----------------------------------------------------------------------------------------
# argument types: argparse turns their ArgumentTypeError into "argument --name: ..." (exit 2)


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {v}")
    return v


SEED_LIMIT = 2 ** 32


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32) (numpy and torch both accept it)."""
    v = _int(text)
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def output_dir(text: str) -> str:
    """argparse type: a folder that exists and is writable, or can be made (the nearest
    existing parent is a writable folder). The run checks again by writing a file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    p = Path(text)
    if p.exists():
        if not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"folder {text!r} is not writable")
        return text
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make folder {text!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot make folder {text!r}: {str(parent)!r} is not writable")
    return text


def device_name(text: str) -> str:
    """argparse type: a torch device that exists here (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {n} CUDA device(s)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


# ----------------------------------------------------------------------------------------
# commands


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
    from .demo import format_adaptive_table, format_table, run_adaptive_demo, run_demo

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adaptive = args.adaptive
    batch = args.batch or (64 if adaptive else 8)
    dim = args.dim or (1024 if adaptive else 256)
    tol = args.tol or (1e-6 if adaptive else 1e-5)
    max_iter = args.max_iter or (3000 if adaptive else 500)
    if adaptive:
        if device != "cpu":
            print("imp-fast demo: error: --adaptive runs on the CPU (the active-set batch is a CPU benchmark)",
                  file=sys.stderr)
            return 2
        print(f"imp_fast demo --adaptive: f(z; s, x) = tanh(s (z W) + x), W symmetric with ||W||_2 = 0.995, per-sample "
              f"scale s from 0.2 to 1.0, batch {batch}, dim {dim}, tol {tol:g} (rel), check every 5, "
              f"{args.threads} thread(s)")
        rows = run_adaptive_demo(batch, dim, tol=tol, max_iter=max_iter, repeats=args.repeats,
                                 include_torchdeq=not args.no_torchdeq)
        print(format_adaptive_table(rows))
        return 0
    print(f"imp_fast demo: f(z) = tanh(W z + x), W symmetric with ||W||_2 = 0.97, batch {batch}, dim {dim}, "
          f"tol {tol:g} (rel), device {device}, {args.threads} thread(s)")
    rows = run_demo(batch, dim, max_iter=max_iter, tol=tol, repeats=args.repeats,
                    device=device, include_torchdeq=not args.no_torchdeq)
    print(format_table(rows))
    bad = [r for r in rows if r["solver"].startswith("imp_fast") and r["converged"] < batch]
    if bad:
        print(f"warning: {len(bad)} imp_fast row(s) did not converge for every sample", file=sys.stderr)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    """Run one case study; under torchrun, join the process group for it (rank 0 prints)."""
    from .models import distributed
    from .models.common import ReproduceError

    prog = f"imp-fast reproduce {args.case}"
    try:
        made = distributed.init_from_env()
    except (RuntimeError, ValueError) as exc:
        print(f"{prog}: error: cannot join the torch.distributed process group: {exc}", file=sys.stderr)
        return 1
    quiet = None if distributed.is_rank0() else open(os.devnull, "w")  # rank 0 alone prints
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            return int(args.runner(args) or 0)
    except ReproduceError as exc:
        if distributed.is_rank0() or not (getattr(exc, "from_rank0", False) or exc.all_ranks):
            where = f"[rank {distributed.rank()}] " if not distributed.is_rank0() else ""
            print(f"{prog}: error: {where}{exc}", file=sys.stderr)
        return 1
    finally:
        if quiet:
            quiet.close()
        if made:
            distributed.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imp-fast", description="Fast batched fixed-point solves for implicit models.")
    p.add_argument("--version", action="version", version=f"imp_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends").set_defaults(func=_info)
    d = sub.add_parser("demo", help="solve the built-in DEQ problem with every backend and compare timings")
    d.add_argument("--batch", type=positive_int, default=None, help="samples, >= 1 (default 8; 64 with --adaptive)")
    d.add_argument("--dim", type=positive_int, default=None,
                   help="state size per sample, >= 1 (default 256; 1024 with --adaptive)")
    d.add_argument("--max-iter", type=positive_int, default=None,
                   help="iteration cap, >= 1 (default 500; 3000 with --adaptive)")
    d.add_argument("--tol", type=positive_float, default=None,
                   help="relative residual, > 0 (default 1e-5; 1e-6 with --adaptive)")
    d.add_argument("--adaptive", action="store_true",
                   help="a batch of easy and hard samples: per-sample iterations, f-rows and time with and "
                        "without active sets (solve(..., compact=True)), and torchdeq's")
    d.add_argument("--repeats", type=positive_int, default=3, help="timed repeats, >= 1 (default %(default)s)")
    d.add_argument("--threads", type=positive_int, default=1, help="torch threads, >= 1 (default %(default)s)")
    d.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
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
