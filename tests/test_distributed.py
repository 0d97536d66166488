"""Data-parallel training: real ``torch.distributed`` processes (gloo on loopback, CPU).

The claim under test: N processes sharing each global batch make the same updates as one process
training on that batch, for every method, and the job survives what jobs meet (a dead rank, a
resume, feedback that differs between ranks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _spawn import spawn

import dfatorch
from dfatorch.data import BatchLoader, load_dataset
from dfatorch.distributed import (
    DDPOptions,
    ProcessGroup,
    check_identical,
    gather_batch,
    shard_loss_scale,
)
from dfatorch.models import build_model
from dfatorch.rundir import RunDir
from dfatorch.train import TrainConfig, load_checkpoint, read_metrics, train

TIMING = {"epoch_seconds", "images_per_second"}
DIGITS = dict(dataset="digits", model="mlp", activation="tanh", batch_size=33)
METHODS = [("bp", "all"), ("dfa", "all"), ("bdfa", "fc")]


def strip_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# -- helpers that need no processes -----------------------------------------------------------


def test_shards_partition_each_global_batch_with_the_same_pixels():
    data = load_dataset("digits").train
    kw = dict(shuffle=True, augment=True, mean=(0.5,), std=(0.25,), seed=3, padding=1)
    whole = BatchLoader(data, 10, **kw)
    shards = [BatchLoader(data, 10, shard=(r, 3), **kw) for r in range(3)]
    whole.set_epoch(2)
    for s in shards:
        s.set_epoch(2)
    full = list(whole)
    parts = [list(s) for s in shards]
    # 1797 * 0.8 = 1438 examples: 143 batches of 10 and one of 8 (>= 3 ranks: kept)
    assert len(full) == len(parts[0]) == len(shards[1]) == 144
    for b, (x, y) in enumerate(full):
        assert whole.global_batch_size(b) == len(y)
        for r in range(3):
            px, py = parts[r][b]
            assert torch.equal(px, x[r::3]) and torch.equal(py, y[r::3])


def test_a_final_batch_smaller_than_the_world_is_dropped_everywhere():
    data = load_dataset("digits").train.subset(torch.arange(21))
    kw = dict(shuffle=False, augment=False, mean=(0.5,), std=(0.25,), seed=0)
    assert len(BatchLoader(data, 10, **kw)) == 3  # 10 + 10 + 1
    assert len(BatchLoader(data, 10, shard=(1, 2), **kw)) == 2  # the 1 would leave rank 1 empty
    assert len(BatchLoader(data, 10, shard=(0, 1), **kw)) == 3
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        BatchLoader(data, 3, shard=(0, 4), **kw)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        BatchLoader(data, 10, shard=(2, 2), **kw)


def test_shard_loss_scale_gives_the_global_mean_gradient_for_uneven_shards():
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    (g_global,) = torch.autograd.grad(F.cross_entropy(x @ w, y), w)
    world = 3  # shards of 3, 2, 2 examples
    grads = []
    for r in range(world):
        xs, ys = x[r::world], y[r::world]
        loss = F.cross_entropy(xs @ w, ys) * shard_loss_scale(len(ys), len(y), world)
        grads.append(torch.autograd.grad(loss, w)[0])
    averaged = sum(grads) / world  # what DDP's all-reduce computes
    torch.testing.assert_close(averaged, g_global, rtol=1e-12, atol=1e-14)


# -- spawned processes --------------------------------------------------------------------------


def _model_and_batch(method: str, scope: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("small_cnn", (3, 16, 16), 10).double()
    engine = dfatorch.attach(model, method, scope=scope, seed=5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(13, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (13,), generator=gen)
    return model, engine, x, y


def _one_step_worker(rank: int, world: int, out: str) -> None:
    group = ProcessGroup(rank, world, rank, "gloo")
    results = {}
    for method, scope in METHODS:
        for options in (DDPOptions(), DDPOptions(find_unused_parameters=True, bucket_cap_mb=0.001)):
            model, _, x, y = _model_and_batch(method, scope)
            ddp = options.wrap(model, torch.device("cpu"))
            xs, ys = x[rank::world], y[rank::world]  # the loader's strided shard
            loss = F.cross_entropy(ddp(xs), ys) * shard_loss_scale(len(ys), len(y), world)
            loss.backward()
            key = f"{method}-{scope}-{options.find_unused_parameters}"
            results[key] = [p.grad.clone() for p in model.parameters()]
    gathered = gather_batch(x[rank::world], y[rank::world], group)
    if rank == 0:
        torch.save({"grads": results, "gathered": gathered}, out)


def test_one_step_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "grads.pt"
    spawn(_one_step_worker, 2, str(out))
    saved = torch.load(out)
    for method, scope in METHODS:
        model, _, x, y = _model_and_batch(method, scope)
        F.cross_entropy(model(x), y).backward()
        expected = [p.grad for p in model.parameters()]
        for find_unused in (False, True):
            got = saved["grads"][f"{method}-{scope}-{find_unused}"]
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    x_back, y_back = saved["gathered"]
    assert torch.equal(x_back, x) and torch.equal(y_back, y)  # the reassembled global batch


def _feedback_worker(rank: int, world: int) -> None:
    group = ProcessGroup(rank, world, rank, "gloo")
    model = build_model("mlp", (1, 8, 8), 10)
    same = dfatorch.attach(model, "dfa", seed=7).materialize(torch.zeros(2, 1, 8, 8))
    check_identical("feedback", same, group)
    same.remove()
    differ = dfatorch.attach(model, "dfa", seed=rank).materialize(torch.zeros(2, 1, 8, 8))
    try:
        check_identical("feedback", differ, group)
    except RuntimeError as exc:
        assert "ranks [1] differ from rank 0" in str(exc)
    else:
        raise AssertionError("feedback drawn from different seeds was not refused")


def test_feedback_that_differs_between_ranks_is_refused():
    spawn(_feedback_worker, 2)


def _trainer_worker(rank: int, world: int, root: str, config: dict[str, Any]) -> None:
    cfg = TrainConfig(**config)
    train(cfg, Path(root) / "whole", progress=False)
    train(cfg, Path(root) / "split", progress=False, epochs=1)
    train(None, Path(root) / "split", resume=True, progress=False, epochs=cfg.epochs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(
            method="dfa",
            scope="all",
            optimizer="sgd",
            lr=0.05,
            init="norm_matched",
            fraction=0.7,
            val_fraction=0.2,
        ),
        dict(method="bdfa", scope="all", optimizer="adam", lr=1e-3, dropout=0.2),
        dict(method="dkp", scope="all", optimizer="sgd", lr=0.05, weight_decay=1e-4),
    ],
    ids=["dfa-sgd-norm-matched", "bdfa-adam-dropout", "dkp-learned-feedback"],
)
def test_trainer_on_two_processes_matches_one_and_resumes_exactly(tmp_path, options):
    config = {**DIGITS, **options, "epochs": 3}
    spawn(_trainer_worker, 2, str(tmp_path / "two"), config)
    one = train(TrainConfig(**config), tmp_path / "one", progress=False).history
    two = read_metrics(tmp_path / "two" / "whole")
    split = read_metrics(tmp_path / "two" / "split")
    # the resumed two-process run is the uninterrupted one, to the bit
    assert strip_timing(split) == strip_timing(two)
    meta = RunDir(tmp_path / "two" / "whole").read_meta()
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    # the same subset, split and evaluation sets as one process (whole sets, not one shard)
    assert meta["data"] == RunDir(tmp_path / "one").read_meta()["data"]
    assert meta["data"]["eval_examples"]["test"] == 359
    if options.get("dropout", 0) == 0:
        # no per-rank randomness: the same run as one process, up to summation order
        for a, b in zip(one, two):
            for key in ("train_loss", "test_loss", "val_loss"):
                assert (a.get(key) is None) == (b.get(key) is None)
                if a.get(key) is not None:
                    assert a[key] == pytest.approx(b[key], rel=1e-5)
            assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 359)
        w1 = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
        w2 = load_checkpoint(tmp_path / "two" / "whole" / "checkpoint.pt")["model"]
        for k in w1:
            torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)
    else:
        # dropout draws differ by rank: the same accuracy within noise
        assert abs(one[-1]["test_acc"] - two[-1]["test_acc"]) < 0.05
        assert two[-1]["test_acc"] > 0.8


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dfatorch", *args], capture_output=True,
                          text=True, env=env, timeout=300, **kw)  # fmt: skip


def test_nproc_rejects_a_bad_option_once_before_launching(tmp_path):
    done = _cli("train", "--dataset", "digits", "--lr", "-1", "--nproc", "2",
                "--out", str(tmp_path / "r"))  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lr" in lines[0]
    assert not (tmp_path / "r").exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_rank_stops_the_job_and_the_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dfatorch", "train", "--dataset", "digits", "--model", "mlp",
         "--method", "bdfa", "--batch-size", "16", "--epochs", "500", "--nproc", "2",
         "--no-progress", "--out", str(run)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # rank 1, somewhere in epoch 2 or later
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGKILL
    assert "error: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoint.pt")  # intact, loadable
    done_epochs = ckpt["epoch"]
    assert 1 <= done_epochs < 500 and len(ckpt["rank_rng"]) == 2
    assert len(read_metrics(run)) == done_epochs
    resumed = _cli("train", "--resume", str(run), "--epochs", str(done_epochs + 2),
                   "--nproc", "2", "--no-progress")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    history = read_metrics(run)
    assert [h["epoch"] for h in history] == list(range(1, done_epochs + 3))
    assert json.loads((run / "config.json").read_text())["distributed"]["world_size"] == 2


@pytest.mark.parametrize("world_size, finalised", [("1", True), ("2", False)])
@pytest.mark.parametrize(
    "entry, code, says",
    [
        ("runpy.run_module('dfatorch', run_name='__main__')", 0, "dfatorch"),  # python -m
        ("from dfatorch import cli; cli.run()", 0, "dfatorch"),  # the console script
        ("from dfatorch import cli; cli.main = lambda: 1 / 0; cli.run()", 1, "ZeroDivisionError"),
    ],
)
def test_a_rank_leaves_without_interpreter_finalisation(world_size, finalised, entry, code, says):
    """The command in a data-parallel rank exits with its code (1 and the traceback for an
    uncaught error) and what it printed, but skips Python's finalisation, where gloo's threads
    can abort a rank whose run already finished."""
    script = ("import atexit, runpy, sys; atexit.register(print, 'FINALISED'); "
              f"sys.argv = ['dfatorch', '--version']; {entry}")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered
    env.update(WORLD_SIZE=world_size, RANK="0")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == code, done.stderr
    assert says in done.stdout + done.stderr  # flushed before leaving
    assert ("FINALISED" in done.stdout) == finalised


def test_a_ctrl_c_the_ranks_outlive_still_ends_the_launch_with_130(monkeypatch):
    """Ranks that finish after the launcher forwarded a Ctrl-C (say, during their last
    evaluation) exit 0; the launch reports the interrupt, so a sweep stops after that cell."""
    import threading

    import dfatorch.distributed as dist

    real = subprocess.Popen
    quiet = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(4)"

    def ranks_that_ignore_ctrl_c(args, **kwargs):
        return real([sys.executable, "-c", quiet], **kwargs)

    monkeypatch.setattr(dist.subprocess, "Popen", ranks_that_ignore_ctrl_c)
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert dist.launch(["train"], 2) == 130
    finally:
        timer.cancel()
    assert dist.launch(["train"], 2) == 0  # no Ctrl-C: they exit 0, and so does the launch


@pytest.mark.slow
def test_experiment_cells_train_data_parallel(tmp_path):
    toml = tmp_path / "dp.toml"
    toml.write_text(
        'name = "dp"\ndescription = "two processes per cell"\n'
        '[base]\ndataset = "digits"\nmodel = "mlp"\nepochs = 2\nbatch_size = 32\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        '[[methods]]\nlabel = "dfa"\nmethod = "dfa"\nscope = "all"\n'
        "[[grid]]\nseed = [0]\n"
    )
    done = _cli("experiment", str(toml), "--nproc", "2", "--no-progress",
                "--runs-root", str(tmp_path / "runs"),
                "--results-root", str(tmp_path / "results"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "results" / "dp" / "summary.json").read_text())
    assert summary["cells_missing"] == 0 and len(summary["rows"]) == 2
    metas = list((tmp_path / "results" / "dp").glob("*/*/config.json"))
    assert metas and all(json.loads(m.read_text())["distributed"]["world_size"] == 2
                         for m in metas)  # fmt: skip
