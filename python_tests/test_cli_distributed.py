"""imp-fast reproduce under torchrun (issue 16): DDP on 2 CPU processes (gloo), rank 0 writes,
the single-process recipe and results are kept; the plumbing in imp_fast.models.distributed."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from imp_fast.cli import main
from imp_fast.models import distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# Failures of the launcher's local networking (a free port taken between torchrun picking it
# and binding it, a rendezvous timeout on a loaded machine), not of imp_fast: such a run is
# tried once more. Anything else (a traceback of ours, a wrong result) fails the test.
_LAUNCHER_FLAKES = ("Address already in use", "DistNetworkError", "RendezvousConnectionError",
                    "RendezvousTimeoutError", "EADDRINUSE")


def _torchrun(args, timeout=150):
    for attempt in range(2):
        res = subprocess.run(TORCHRUN + args, capture_output=True, text=True, timeout=timeout, env=_env())
        if res.returncode == 0 or not any(s in res.stderr for s in _LAUNCHER_FLAKES):
            return res
    return res


# ----------------------------------------------------------------------------------------
# one process: the helpers are the identity


def test_single_process_helpers_change_nothing():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_rank0()) == (0, 1, True)
    m = torch.nn.Linear(2, 2)
    assert distributed.wrap(m) is m
    assert distributed.shard(7) == slice(0, 7)
    assert distributed.shard_weight(7, 7) == 1.0
    assert distributed.average(torch.tensor(2.5)) == 2.5
    stats = {"a": [1.0, 2.0]}
    assert distributed.reduce_shards(3, stats, {"a": "mean"}) is stats
    assert distributed.rank0_call(lambda: 41 + 1) == 42
    assert distributed.init_from_env() is False  # no torchrun variables in the test process


@pytest.mark.parametrize("n", [0, 1, 2, 5, 16, 17])
@pytest.mark.parametrize("w", [1, 2, 3, 8])
def test_shards_partition_the_range(n, w):
    parts = [distributed.shard(n, r, w) for r in range(w)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [t.numel() for t in torch.tensor_split(torch.arange(n), w)]


# ----------------------------------------------------------------------------------------
# two processes


@pytest.mark.slow
def test_torchrun_two_processes_looped_transformer_quick(tmp_path):
    """The issue's acceptance run: torchrun --standalone --nproc_per_node 2 imp-fast reproduce
    looped-transformer --quick. One checkpoint, results.json with world_size 2, and the same
    training (losses) and results as the single-process run."""
    out = tmp_path / "ddp"
    res = _torchrun(["-m", "imp_fast.cli", "reproduce", "looped-transformer", "--quick", "--out", str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ddp = json.loads((out / "results.json").read_text())
    assert ddp["world_size"] == 2 and ddp["trained"] is True
    assert sorted(p.name for p in out.iterdir()) == [
        "looped_transformer_quick.pt", "looped_transformer_scaling.png", "results.json"]
    assert res.stdout.count("saved ") == 1 and res.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert torch.load(out / "looped_transformer_quick.pt", weights_only=True)["meta"]["steps"] == 30

    single = tmp_path / "single"
    assert main(["reproduce", "looped-transformer", "--quick", "--out", str(single)]) == 0
    one = json.loads((single / "results.json").read_text())
    assert one["world_size"] == 1
    assert len(ddp["train_loss"]) == len(one["train_loss"]) == 30
    for a, b in zip(ddp["train_loss"], one["train_loss"]):
        assert math.isclose(a, b, rel_tol=1e-4), (ddp["train_loss"], one["train_loss"])
    for key in ("token_accuracy", "sequence_accuracy", "separation"):
        assert ddp[key] == pytest.approx(one[key], abs=0.02), key
    assert ddp["target_separation"] == pytest.approx(one["target_separation"], rel=1e-9)


@pytest.mark.slow
def test_torchrun_bad_checkpoint_is_reported_once(tmp_path):
    (tmp_path / "looped_transformer_quick.pt").write_bytes(b"not a checkpoint")
    res = _torchrun(["-m", "imp_fast.cli", "reproduce", "looped-transformer", "--quick", "--out", str(tmp_path)])
    assert res.returncode != 0
    assert res.stderr.count("imp-fast reproduce looped-transformer: error: checkpoint") == 1, res.stderr
    assert "--retrain" in res.stderr


PLUMBING = r'''
import json, os, sys
import torch
from imp_fast.models import common, distributed
from imp_fast.scaling import relative_l2

tmp = sys.argv[1]
torch.set_num_threads(1)
report = {}


class G(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.W = torch.nn.Linear(6, 6, bias=False)
        self.U = torch.nn.Linear(6, 6)
        with torch.no_grad():
            self.W.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


gen = torch.Generator().manual_seed(0)
x = torch.randn(40, 6, generator=gen)
y = torch.tanh(x.flip(1))
x_te, y_te = x[:5], y[:5]


seen = {"train": set(), "eval": set()}


def counted(kind):
    def loss(pred, target):
        seen[kind].add(pred.shape[0])
        return relative_l2(pred, target)
    return loss


def fit(model):
    return common.train(model, counted("train"), x, y, z0_fn=torch.zeros_like, steps=12, batch=9, lr=1e-2,
                        t_range=(3, 7), k_grad=2, seed=3)


def curve(model):
    return common.evaluate(model, x_te, y_te, counted("eval"), z0=torch.zeros_like(x_te),
                           directions=torch.eye(6)[:3], ts=(1, 3, 8), metric_name="rel")


# single-process references, before joining the group
torch.manual_seed(0)
ref = G()
ref_losses = fit(ref)
ref_curve = curve(ref)
assert not distributed.is_distributed() and seen == {"train": {9}, "eval": {5}}
seen = {"train": set(), "eval": set()}

assert distributed.init_from_env() is True
r, w = distributed.rank(), distributed.world_size()
report.update(rank=r, world=w, shard=[distributed.shard(10).start, distributed.shard(10).stop])

# training: same losses and weights as the single-process run
torch.manual_seed(0)
m = G()
if r == 1:
    with torch.no_grad():
        m.U.bias.add_(5.0)  # DDP starts every rank from rank 0's weights
losses = fit(m)
report["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
report["weight_diff"] = max(float((p - q).abs().max()) for p, q in zip(m.parameters(), ref.parameters()))

# sharded evaluation equals the single-process curve
c = curve(m)
report["curve"] = dict(L=c.L, metric=c.metric, residual=c.residual)
report["ref_curve"] = dict(L=ref_curve.L, metric=ref_curve.metric, residual=ref_curve.residual)
report["seen"] = {k: sorted(v) for k, v in seen.items()}  # samples per rank per step / evaluation

# reductions, an empty shard included
mine = {"m": 1.0, "x": [1.0, 5.0], "f": "same"} if r == 0 else {"m": 4.0, "x": [2.0, 3.0], "f": "same"}
report["reduced"] = distributed.reduce_shards(3 if r == 0 else 1, mine, {"m": "mean", "x": "max"})
report["reduced_empty"] = distributed.reduce_shards(2 if r == 0 else 0, {"m": 7.0} if r == 0 else None, {"m": "mean"})

# checkpoints: rank 0 alone writes; a loaded checkpoint reaches every rank
own = os.path.join(tmp, f"rank{r}")
os.makedirs(own, exist_ok=True)
info = common.load_or_train(os.path.join(own, "m.pt"), m, lambda: [1.0], False, {"k": 1})
report["trained"] = info["trained"]
distributed.barrier()
report["files"] = sorted(os.listdir(own))
fresh = G()
with torch.no_grad():
    for p in fresh.parameters():
        p.fill_(float(r + 1))
shared = os.path.join(tmp, "rank0", "m.pt")
info = common.load_or_train(shared, fresh, lambda: [1.0], False, {"k": 1})
report["loaded"] = not info["trained"]
report["loaded_equal"] = all(torch.equal(p, q) for p, q in zip(fresh.parameters(), m.parameters()))

# an error on rank 0 stops every rank
bad = os.path.join(tmp, "bad.pt")
if r == 0:
    with open(bad, "wb") as f:
        f.write(b"garbage")
distributed.barrier()
try:
    common.load_or_train(bad, fresh, lambda: [1.0], False, {"k": 1})
    report["error"] = None
except common.CheckpointError as exc:
    report["error"] = [str(exc), getattr(exc, "from_rank0", False)]

with open(os.path.join(tmp, f"report{r}.json"), "w") as f:
    json.dump(report, f)
distributed.cleanup()
'''


@pytest.mark.slow
def test_torchrun_plumbing_train_eval_checkpoints(tmp_path):
    script = tmp_path / "plumbing.py"
    script.write_text(textwrap.dedent(PLUMBING))
    res = _torchrun([str(script), str(tmp_path)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reps = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1)]
    assert [rp["world"] for rp in reps] == [2, 2]
    assert [rp["shard"] for rp in reps] == [[0, 5], [5, 10]]
    # each rank trains on its shard of every minibatch of 9 and evaluates its shard of the 5 test samples
    assert [rp["seen"] for rp in reps] == [{"train": [5], "eval": [3]}, {"train": [4], "eval": [2]}]
    for rp in reps:
        # DDP on shards of each minibatch follows the single-process recipe
        assert rp["loss_diff"] < 1e-5 and rp["weight_diff"] < 1e-5, rp
        for k in ("L", "metric", "residual"):
            assert rp["curve"][k] == pytest.approx(rp["ref_curve"][k], rel=1e-5, abs=1e-7), k
        assert rp["reduced"] == {"m": 1.75, "x": [2.0, 5.0], "f": "same"}
        assert rp["reduced_empty"] == {"m": 7.0}
        assert rp["trained"] is True and rp["loaded"] is True and rp["loaded_equal"] is True
        assert "'" + str(tmp_path / "bad.pt") + "'" in rp["error"][0] and "--retrain" in rp["error"][0]
    assert reps[0]["files"] == ["m.pt"] and reps[1]["files"] == []  # rank 1 wrote nothing
    assert reps[0]["error"][1] is False and reps[1]["error"][1] is True
