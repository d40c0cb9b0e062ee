"""ImplicitLayer under DistributedDataParallel: 2 processes on CPU (gloo, loopback only),
started with torchrun (torch.distributed.run), as users run multi-process training.

- Gradients: every rank trains on its half of a global batch; after each backward the
  DDP-averaged gradients equal those of ONE process on the whole batch (mean loss), for
  backward="ift", "jfb" and "phantom", over two SGD steps (so the second step also
  checks that the ranks' parameters stayed in sync).
- No deadlock when the ranks' solves take different numbers of iterations: each rank's
  data converges at its own iteration count (the forward and, for "ift", the adjoint
  solve in backward); in the second scenario one rank stops at max_iter while the other
  converges in a few iterations, with host checks every iteration and active sets.

Every launch has a deadline (the process group's collective timeout inside; outside,
torchrun and its workers are stopped after LAUNCH_TIMEOUT_S), so a hang fails the test
instead of blocking CI. This file is also the worker script (``--worker SCENARIO OUTDIR``).
"""
import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import imp_fast

WORLD = 2
PER_RANK = 4  # samples per rank; equal shards, so DDP's mean of rank means is the global mean
MODES = ("ift", "jfb", "phantom")
COLLECTIVE_TIMEOUT_S = 45  # gloo: a collective that waits longer raises in the worker
LAUNCH_TIMEOUT_S = 120  # the whole torchrun launch, killed after that

# Per scenario: the layer's options, the input scale of each rank's shard (the layer's
# iteration count depends on it: large inputs saturate tanh and converge fast), and the
# number of SGD steps.
SCENARIOS = {
    # anderson, default host checks; rank 0's samples converge in ~7-18 iterations, rank 1's in ~100-120
    "grads": dict(layer=dict(max_iter=200, tol=1e-11), scales=(30.0, 0.1), steps=2),
    # picard checked every iteration, active sets; rank 1 runs into max_iter (not converged)
    "uneven": dict(
        layer=dict(method="picard", max_iter=150, tol=1e-12, check_every=1, compact=True, on_adjoint_failure="ignore"),
        scales=(30.0, 0.01),
        steps=3,
    ),
}


class _Cell(nn.Module):
    """G(z, x) = tanh(W z + x + b), ||W|| = 0.9 (contractive, slowly near x = 0)."""

    def __init__(self, h):
        super().__init__()
        self.W = nn.Parameter(0.9 * torch.linalg.qr(torch.randn(h, h))[0])
        self.b = nn.Parameter(0.1 * torch.randn(h))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


def _model(mode, scenario):
    torch.manual_seed(0)
    layer = imp_fast.ImplicitLayer(_Cell(16), backward=mode, **SCENARIOS[scenario]["layer"])
    return nn.Sequential(nn.Linear(3, 16), layer, nn.Linear(16, 1)).double()


def _data(scenario):
    """The global batch: rank r's shard is rows [r * PER_RANK, (r + 1) * PER_RANK)."""
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor(SCENARIOS[scenario]["scales"], dtype=torch.float64).repeat_interleave(PER_RANK)
    x = torch.randn(WORLD * PER_RANK, 3, generator=g, dtype=torch.float64) * scales[:, None]
    y = torch.randn(WORLD * PER_RANK, 1, generator=g, dtype=torch.float64)
    return x, y


def _train(model, module, x, y, steps):
    """SGD steps of ``model`` (``module`` itself or its DDP wrapper); what each step saw."""
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    steps_out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        res = module[1].last_result
        adj = res.extras.get("adjoint")
        steps_out.append(dict(
            loss=loss.detach(),
            grads={n: p.grad.detach().clone() for n, p in module.named_parameters()},
            n_iter=res.n_iter.clone(),
            status=res.status.clone(),
            adjoint_n_iter=None if adj is None else adj.n_iter.clone(),
        ))
        opt.step()
    return dict(steps=steps_out, params={n: p.detach().clone() for n, p in module.named_parameters()})


def _worker(scenario, outdir):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == WORLD, world
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        x, y = _data(scenario)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        out = {}
        for mode in MODES:
            module = _model(mode, scenario)
            ddp = nn.parallel.DistributedDataParallel(module)
            out[mode] = _train(ddp, module, x[rows], y[rows], SCENARIOS[scenario]["steps"])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------------------
# the parent (pytest) side

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo not available"
)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid):
    """Pids of the processes under ``pid`` (Linux /proc; empty elsewhere)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(proc):
    """End a launch that ran out of time: torchrun ends its workers on SIGTERM; whatever
    is left after a grace period (torchrun starts each worker in a session of its own)
    is killed by pid."""
    tree = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch(scenario, outdir, tries=2):
    """torchrun this file's worker on WORLD local processes; the per-rank results.
    A launch whose free port was taken in between (by another process) is retried."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # the children import the imp_fast this process imported (checkout or installed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(imp_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(WORLD), "--max_restarts", "0",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "--log-dir", os.path.join(outdir, "elastic"),  # not a fresh /tmp/torchelastic_* per launch
        os.path.abspath(__file__), "--worker", scenario, str(outdir),
    ]
    # Output to a file, not a pipe: a worker that outlives torchrun would hold a pipe open.
    log_path = os.path.join(outdir, "torchrun.log")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
            hung = False
        except subprocess.TimeoutExpired:
            _stop(proc)
            hung = True
    with open(log_path) as fh:
        log = fh.read()[-6000:]
    if hung:
        pytest.fail(f"DDP scenario {scenario!r} did not finish in {LAUNCH_TIMEOUT_S} s (hang?):\n{log}")
    if proc.returncode != 0 and tries > 1 and "address already in use" in log.lower():
        return _launch(scenario, outdir, tries - 1)
    if proc.returncode != 0:
        pytest.fail(f"DDP scenario {scenario!r} failed (exit {proc.returncode}):\n{log}")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


_cache = {}


def _ddp_results(scenario, tmp_path_factory):
    """One launch per scenario, shared by its tests (a failed one is not retried per test)."""
    if scenario not in _cache:
        try:
            _cache[scenario] = _launch(scenario, tmp_path_factory.mktemp(f"ddp_{scenario}"))
        except pytest.fail.Exception as exc:
            _cache[scenario] = exc
            raise
    got = _cache[scenario]
    if isinstance(got, BaseException):
        pytest.fail(f"the {scenario!r} launch failed in an earlier test: {str(got)[:300]}")
    return got


def _single_process(scenario, mode):
    x, y = _data(scenario)
    module = _model(mode, scenario)
    return _train(module, module, x, y, SCENARIOS[scenario]["steps"])


def _assert_matches_single_process(ranks, single):
    for k, ref in enumerate(single["steps"]):
        for r, res in enumerate(ranks):
            got = res["steps"][k]["grads"]
            assert got.keys() == ref["grads"].keys()
            for name in ref["grads"]:
                torch.testing.assert_close(
                    got[name], ref["grads"][name], rtol=1e-8, atol=1e-12,
                    msg=lambda m, n=name, s=k, rr=r: f"step {s}, rank {rr}, grad of {n}: {m}",
                )
    for r, res in enumerate(ranks):
        for name, p in single["params"].items():
            torch.testing.assert_close(res["params"][name], p, rtol=1e-8, atol=1e-12,
                                       msg=lambda m, n=name, rr=r: f"rank {rr}, parameter {n} after training: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_ddp_gradients_equal_one_process_on_the_whole_batch(mode, tmp_path_factory):
    ranks = _ddp_results("grads", tmp_path_factory)
    single = _single_process("grads", mode)
    # per-sample solves: each rank's samples took the iterations they take in the whole batch
    for k, ref in enumerate(single["steps"]):
        fast, slow = (r[mode]["steps"][k]["n_iter"] for r in ranks)
        assert torch.equal(torch.cat([fast, slow]), ref["n_iter"])
        assert bool((ref["status"] == int(imp_fast.Status.CONVERGED)).all())
        assert int(slow.min()) >= 3 * int(fast.max())  # the ranks' solves are uneven
    _assert_matches_single_process([r[mode] for r in ranks], single)


@pytest.mark.parametrize("mode", MODES)
def test_ranks_converging_at_different_iterations_do_not_deadlock(mode, tmp_path_factory):
    ranks = _ddp_results("uneven", tmp_path_factory)  # finished (no hang) and exited cleanly
    max_iter = SCENARIOS["uneven"]["layer"]["max_iter"]
    for step in range(SCENARIOS["uneven"]["steps"]):
        fast, slow = (r[mode]["steps"][step] for r in ranks)
        # rank 0 converged in a fraction of max_iter, rank 1 ran into max_iter
        assert bool((fast["status"] == int(imp_fast.Status.CONVERGED)).all())
        assert int(fast["n_iter"].max()) <= max_iter // 3
        assert bool((slow["status"] == int(imp_fast.Status.MAX_ITER)).all())
        assert int(slow["n_iter"].min()) == max_iter
        if mode == "ift":  # the adjoint solves in backward are just as uneven
            assert int(fast["adjoint_n_iter"].max()) <= max_iter // 3
            assert int(slow["adjoint_n_iter"].max()) == max_iter
    # and training stayed exact: the same gradients and parameters as one process
    _assert_matches_single_process([r[mode] for r in ranks], _single_process("uneven", mode))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DDP worker of python_tests/test_distributed.py (run by torchrun)")
    parser.add_argument("--worker", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("outdir")
    args = parser.parse_args()
    _worker(args.worker, args.outdir)
