"""The trainer and the command line on the embedded digits data: files, exact resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfatorch.cli import main
from dfatorch.data import load_dataset
from dfatorch.train import (
    NonFiniteLossError,
    TrainConfig,
    load_checkpoint,
    read_metrics,
    train,
)

TIMING = {"epoch_seconds", "images_per_second"}
FAST = dict(dataset="digits", model="mlp", activation="tanh", batch_size=32, epochs=3)


def strip_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_run_folder_contents(tmp_path):
    config = TrainConfig(**FAST, method="bdfa", scope="all", dropout=0.2)
    result = train(config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    meta = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(meta["config"]) == config
    assert meta["environment"]["torch"] == torch.__version__
    assert "git_commit" in meta["environment"]
    # Flatten, Linear, Tanh, Dropout, Linear, Tanh, Dropout, Linear
    assert meta["engine"]["rules"] == {"1": "bdfa", "4": "bdfa", "7": "bp"}
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    keys = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
            "images_per_second"}  # fmt: skip
    assert keys <= set(records[0])
    assert records == result.history
    ckpt = load_checkpoint(run / "checkpoint.pt")  # weights_only=True
    assert ckpt["epoch"] == 3 and ckpt["batch"] == 0
    assert "feedback.pattern" in ckpt["engine"]
    # digits: 1438 training images, chance is 10%
    assert records[-1]["test_acc"] > 0.6
    with pytest.raises(FileExistsError):
        train(config, run, progress=False)


def test_resume_after_ctrl_c_mid_epoch_is_exact(tmp_path, monkeypatch):
    config = TrainConfig(**FAST, method="dfa", scope="all", dropout=0.3, schedule="cosine")
    reference = train(config, tmp_path / "ref", progress=False).history

    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def interrupting(logits, target, *args, **kwargs):
        if not kwargs and not args:  # training-step calls; evaluation passes reduction="sum"
            calls["n"] += 1
            if calls["n"] == 60:  # epoch 2 of 45 batches each, mid-way: a real Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupting)
    stopped = train(config, tmp_path / "run", progress=False)
    assert stopped.interrupted and len(stopped.history) == 1
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 15)  # the step in progress was finished
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    resumed = train(None, tmp_path / "run", resume=True, progress=False)
    assert strip_timing(resumed.history) == strip_timing(reference)


@pytest.mark.slow
def test_resume_after_kill_9_is_exact(tmp_path):
    args = ["--dataset", "digits", "--model", "mlp", "--width", "0.1", "--method", "bdfa",
            "--scope", "all", "--batch-size", "8", "--epochs", "6", "--dropout", "0.2",
            "--no-progress"]  # fmt: skip
    # one thread: tiny steps on a loaded 2-core machine otherwise spend their time spin-waiting
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "dfatorch", "train", *args, "--out", str(ref)],
                   check=True, env=env, capture_output=True)  # fmt: skip
    run = tmp_path / "run"
    command = [sys.executable, "-m", "dfatorch", "train", *args, "--out", str(run)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_metrics(run)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(run))
    assert 2 <= done < 6, f"the run was not killed mid-way ({done} epochs)"
    # resumed the same way: float sums are exact only with the same thread count
    resume = [sys.executable, "-m", "dfatorch", "train", "--resume", str(run), "--no-progress"]
    subprocess.run(resume, check=True, env=env, capture_output=True)
    assert strip_timing(read_metrics(run)) == strip_timing(read_metrics(ref))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    options = {**FAST, "epochs": 20, "activation": "relu"}
    config = TrainConfig(
        **options, method="dfa", scope="all", optimizer="sgd", lr=1e8, divergence_factor=0
    )
    with pytest.raises(NonFiniteLossError, match="the loss became") as info:
        train(config, tmp_path / "run", progress=False)
    assert "checkpoint" in str(info.value)
    records = read_metrics(tmp_path / "run")
    if (tmp_path / "run" / "checkpoint.pt").exists():  # a good epoch finished before the blow-up
        ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
        assert ckpt["epoch"] == len(records)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_validation_split_never_touches_test(tmp_path):
    config = TrainConfig(**FAST, method="bdfa", val_fraction=0.2, eval_test=False)
    history = train(config, tmp_path / "run", progress=False).history
    assert history[-1]["test_acc"] is None and history[-1]["val_acc"] > 0.5
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    held = meta["data"]["eval_examples"]["val"]
    total = len(load_dataset("digits").train)
    assert list(meta["data"]["eval_examples"]) == ["val"] and abs(held - 0.2 * total) < 10
    assert meta["data"]["train_examples"] == total - held


def test_val_size_validates_outside_the_training_subset(tmp_path):
    config = TrainConfig(**{**FAST, "epochs": 1}, method="bp", fraction=0.1, val_size=300,
                         eval_test=False)  # fmt: skip
    history = train(config, tmp_path / "run", progress=False).history
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    measured = TrainConfig(**{**FAST, "epochs": 1}, method="bp", fraction=0.1)
    train(measured, tmp_path / "measured", progress=False)
    alone = json.loads((tmp_path / "measured" / "config.json").read_text())
    assert meta["data"]["train_examples"] == alone["data"]["train_examples"]  # subset keeps size
    assert meta["data"]["eval_examples"] == {"val": 300} and history[-1]["val_acc"] is not None
    for bad in (300.0, True):  # a TOML float or boolean is not a count of examples
        with pytest.raises(ValueError, match="val_size must be a whole number"):
            TrainConfig(fraction=0.1, val_size=bad)


def test_fraction_trains_on_a_stratified_subset(tmp_path):
    config = TrainConfig(**{**FAST, "epochs": 1}, method="bp", fraction=0.1)
    train(config, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert 140 <= meta["data"]["train_examples"] <= 150


def test_cli_train_compare_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "bp,dfa:all,bdfa", "--dataset", "digits", "--model",
                 "small_cnn", "--epochs", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for label in ("bp", "dfa-all", "bdfa-fc"):
        assert label in text
        assert len(read_metrics(out / label)) == 2
    assert (out / "compare.png").stat().st_size > 10_000
    # a second call finds every run finished and trains nothing
    mtime = (out / "bp" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["compare", "--methods", "bp", "--dataset", "digits", "--model", "small_cnn",
                 "--epochs", "2", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert (out / "bp" / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert (
        main(["plot", str(out / "bp"), str(out / "bdfa-fc"), "--out", str(tmp_path / "c.png")]) == 0
    )
    assert (tmp_path / "c.png").exists()
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "d.png")]) == 2


def test_cli_errors_are_messages(tmp_path, capsys):
    assert main(["train", "--fraction", "0", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--method", "sgd", "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "--method: invalid choice: 'sgd'" in err


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.mark.data
@pytest.mark.slow
def test_bdfa_learns_real_mnist(tmp_path):
    """A few hundred steps of hybrid BDFA on real MNIST (5% of the training set, the full test set)
    must clearly beat chance (10%)."""
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"{SHARED / 'mnist'} not found")
    data = {"dataset": "mnist", "data_dir": str(SHARED), "fraction": 0.05}
    rule = {"method": "bdfa", "scope": "fc", "storage": "packed"}
    config = TrainConfig(**data, **rule, model="small_cnn", epochs=2, batch_size=16)
    history = train(config, tmp_path / "run", progress=False).history
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["data"]["train_examples"] == 3000 and meta["data"]["eval_examples"]["test"] == 10000
    assert history[-1]["test_acc"] > 0.6  # 375 steps


def test_bottleneck_narrows_the_middle_layer_and_trainable_units_freeze_the_rest():
    """Launay et al.'s bottleneck is a narrower layer (3072-800-b-800-10); the frozen-units variant
    keeps the width and trains only the first b units' rows."""
    from torch import nn

    from dfatorch.models import build_model

    narrow = build_model("mlp_3x800", (3, 32, 32), 10, bottleneck=5)
    widths = [m.out_features for m in narrow if isinstance(m, nn.Linear)]
    assert widths == [800, 5, 800, 10]
    frozen = build_model("mlp_3x800", (3, 32, 32), 10, trainable_units=5)
    middle = [m for m in frozen if isinstance(m, nn.Linear)][1]
    assert middle.out_features == 800
    frozen(torch.randn(4, 3, 32, 32)).sum().backward()
    assert middle.weight.grad[:5].abs().sum() > 0 and middle.weight.grad[5:].abs().sum() == 0
    with pytest.raises(ValueError, match="bottleneck"):
        TrainConfig(dataset="digits", model="small_cnn", bottleneck=5)


def test_evaluation_is_batch_size_free_and_keeps_no_graph():
    """The trainer's evaluation batch changes speed only: with batch norm in eval mode every
    example is scored alone, so loss and accuracy match batch by batch of 7; and no autograd
    graph is recorded (the trainer calls the summing helper directly, outside `evaluate`)."""
    from dfatorch.data import BatchLoader
    from dfatorch.models import build_model
    from dfatorch.train import EVAL_BATCH_SIZE, _evaluation_sums

    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small_cnn", splits.input_shape, splits.num_classes, batch_norm=True)
    model.train()
    for _ in range(3):  # batch statistics that differ from the initial running ones
        model(torch.randn(16, *splits.input_shape))
    norm = dict(mean=splits.mean, std=splits.std, seed=0)
    grad_modes: list[bool] = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    sums = {
        size: _evaluation_sums(
            model, BatchLoader(splits.test, size, shuffle=False, augment=False, **norm), False, None
        )
        for size in (7, EVAL_BATCH_SIZE)
    }
    (loss_a, correct_a, seen_a), (loss_b, correct_b, seen_b) = sums.values()
    assert seen_a == seen_b == len(splits.test) and correct_a == correct_b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grad_modes and not any(grad_modes)
    assert model.training  # put back as it was


@pytest.mark.parametrize("method, scope", [("bp", "all"), ("dfa", "all"), ("bdfa", "fc")])
def test_channels_last_trains_the_same_steps_up_to_rounding(tmp_path, method, scope):
    """The layout is a speed option (the experiment runner counts a cell run either way): with
    batch norm, dropout and augmentation, two steps give the same weights and statistics up to
    float rounding. (Over a whole run the rounding grows, as between devices: digits' few grey
    levels make ties in max-pooling that rounding breaks either way.)"""
    base = dict(dataset="digits", model="small_cnn", activation="relu", batch_norm=True,
                dropout=0.3, augment=True, optimizer="sgd", momentum=0.9, lr=0.05,
                batch_size=64, fraction=0.08, epochs=1, method=method, scope=scope)  # fmt: skip
    weights = []
    for layout in (False, True):
        folder = tmp_path / f"{method}-{layout}"
        train(TrainConfig(**base, channels_last=layout), folder, progress=False)
        checkpoint = load_checkpoint(folder / "checkpoint.pt")
        assert checkpoint["model"]["1.num_batches_tracked"] == 2  # two steps
        weights.append(checkpoint["model"])
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=2e-6)


def _denormal_product() -> float:
    """1e-30 * 1e-10 in float32: 1e-40 is denormal, so 0.0 where denormals are flushed."""
    return (torch.full((1,), 1e-30) * 1e-10).item()


def test_training_flushes_denormals_and_then_restores_the_default(tmp_path):
    """Dead channels' weights decay into denormal floats, where CPU arithmetic runs in microcode
    (benchmarks/denormals.py): the trainer flushes them while it trains, also when a run stops
    on an error, and restores PyTorch's default after."""
    from dfatorch.callbacks import Callback

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    assert _denormal_product() > 0
    seen: list[float] = []

    class Probe(Callback):
        def after_step(self, state):
            seen.append(_denormal_product())

    config = TrainConfig(**{**FAST, "epochs": 1})
    train(config, tmp_path / "run", progress=False, callbacks=[Probe()])
    assert seen and all(v == 0.0 for v in seen)
    assert _denormal_product() > 0
    torch.set_flush_denormal(True)  # a caller who flushes already keeps flushing after
    try:
        train(config, tmp_path / "again", progress=False)
        assert _denormal_product() == 0.0
    finally:
        torch.set_flush_denormal(False)
    diverging = TrainConfig(**{**FAST, "activation": "relu"}, optimizer="sgd", lr=1e8,
                            divergence_factor=0)  # fmt: skip
    with pytest.raises(NonFiniteLossError):
        train(diverging, tmp_path / "diverged", progress=False)
    assert _denormal_product() > 0


def test_the_denormals_benchmark_keeps_denormals_only_without_flushing(tmp_path):
    """benchmarks/denormals.py in one short round: the state it builds holds denormal weights
    that survive training steps without flushing and none with it; the report tabulates it."""
    import importlib.util

    from dfatorch.report import _denormals_section

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "denormals.py"
    spec = importlib.util.spec_from_file_location("denormals", path)
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(path.parent))  # its `_common` import
    threads = torch.get_num_threads()
    try:
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "denormals.json"
        # one thread: the flag is per thread, and this process's worker threads started without it
        argv = ["--rounds", "1", "--warmup", "0", "--steps", "2", "--threads", "1"]
        bench.main([*argv, "--out", str(out)])
    finally:
        sys.path.remove(str(path.parent))
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())["result"]
    assert result["denormal_weights_injected"] == 4 * (64 * 9 + 256 * 16)
    assert result["denormal_weights_after_steps"]["flush_off"] == 4 * (64 * 9 + 256 * 16)
    assert result["denormal_weights_after_steps"]["flush_on"] == 0
    assert _denormal_product() > 0  # the benchmark put the default back
    text = "\n".join(_denormals_section(out))
    assert "## Speed: denormal floats" in text and "18,688 of their weights" in text
