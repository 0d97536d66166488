"""Differentially private training: per-example updates against explicit formulas (float64), the
sensitivity bound on real tensors, the noise's calibration, the accountant against opacus and a
published anchor, exact resume and the refusals."""

from __future__ import annotations

import io
import math
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfatorch
from dfatorch.data import BatchLoader, load_dataset
from dfatorch.models import build_model
from dfatorch.privacy import (
    DifferentialPrivacy,
    PrivacyAccountant,
    _NativeUpdates,
    noise_for_epsilon,
)
from dfatorch.train import TrainConfig, load_checkpoint, train

TIMING = {"epoch_seconds", "images_per_second"}
PRIVATE = dict(dataset="digits", model="mlp", width=0.1, batch_size=64, epochs=2, private=True,
               delta=1e-4, clip=1.0, optimizer="sgd", lr=0.5)  # fmt: skip


def _strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# -- the accountant ----------------------------------------------------------------------------


def test_accountant_matches_the_published_anchor_and_opacus():
    from opacus.accountants import RDPAccountant

    q = 256 / 60000
    steps = int(60 / q)
    ours = PrivacyAccountant(1.1, q)
    ours.step(steps)
    assert ours.epsilon(1e-5) == pytest.approx(2.60, abs=0.01)  # dp-accounting's RDP, 60 epochs
    for sigma, rate, n, delta in [(1.1, q, steps, 1e-5), (0.8, 0.01, 3000, 1e-6),
                                  (2.0, 0.05, 500, 1e-5)]:  # fmt: skip
        theirs = RDPAccountant()
        theirs.history = [(sigma, rate, n)]
        mine = PrivacyAccountant(sigma, rate).epsilon(delta, steps=n)
        assert mine == pytest.approx(theirs.get_epsilon(delta), rel=0.02)


def test_noise_for_epsilon_is_the_smallest_noise_within_the_budget():
    q, steps = 64 / 1438, 200
    sigma = noise_for_epsilon(3.0, 1e-4, q, steps, tolerance=0.002)
    spent = PrivacyAccountant(sigma, q).epsilon(1e-4, steps=steps)
    assert spent <= 3.0
    assert PrivacyAccountant(sigma * 0.99, q).epsilon(1e-4, steps=steps) > 3.0
    with pytest.raises(ValueError, match="target epsilon must be > 0"):
        noise_for_epsilon(0.0, 1e-5, q, steps)


# -- per-example updates --------------------------------------------------------------------------


def _net(kind: str, method: str, scope: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = build_model("mlp", (1, 6, 6), 5, hidden=(7, 6)).double()
    else:
        model = build_model("small_cnn", (3, 12, 12), 5, width=0.25).double()
    dfatorch.attach(model, method, scope=scope, seed=3)
    return model


def _explicit_clipped_sum(model: nn.Module, x, y, clip: float):
    """Each example alone through the model (its per-example update, by definition), its norm over
    all parameters, clipped, summed: what DP-SGD/DP-DFA must compute, the slow way."""
    updates = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        updates.append([p.grad.clone() for p in model.parameters()])
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in u)) for u in updates]
    factors = [min(1.0, clip / (n + 1e-6)) for n in norms]
    sums = [sum(f * u[k] for f, u in zip(factors, updates)) for k in range(len(updates[0]))]
    return sums, norms


@pytest.mark.parametrize(
    "kind, method, scope",
    [
        ("mlp", "dfa", "all"),
        ("mlp", "bp", "all"),
        ("cnn", "dfa", "all"),
        ("cnn", "bdfa", "fc"),
        ("cnn", "bp", "all"),
        ("mlp", "fa", "all"),
    ],
)
def test_native_clipped_sums_equal_the_per_example_formula(kind, method, scope):
    model = _net(kind, method, scope)
    gen = torch.Generator().manual_seed(1)
    shape = (9, 1, 6, 6) if kind == "mlp" else (9, 3, 12, 12)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (9,), generator=gen)
    _, norms = _explicit_clipped_sum(model, x, y, math.inf)
    clip = sorted(norms)[4]  # the median: some examples are clipped, some are not
    expected, _ = _explicit_clipped_sum(model, x, y, clip)
    assert min(norms) < clip < max(norms)
    updates = _NativeUpdates(model)
    updates.enabled = True
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sums, native_norms = updates.clipped_sums(clip)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(sums[p], e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(native_norms, torch.tensor(norms, dtype=torch.float64), rtol=1e-9,
                               atol=0)  # fmt: skip


def test_the_epoch_record_counts_clipped_examples_and_their_mean_norm():
    """Two steps of one epoch: the share of examples above the clip and the mean norm before
    clipping, against the explicit per-example norms."""
    model = _net("cnn", "dfa", "all")
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(n, 3, 12, 12, generator=gen, dtype=torch.float64),
                torch.randint(0, 5, (n,), generator=gen)) for n in (7, 4)]  # fmt: skip
    norms = [v for x, y in batches for v in _explicit_clipped_sum(model, x, y, math.inf)[1]]
    clip = sum(sorted(norms)[3:5]) / 2  # 7 of the 11 are above it, none near it
    dp = DifferentialPrivacy(clip=clip, delta=1e-5, batch_size=6, noise_multiplier=1.0)
    dp.accountant = PrivacyAccountant(1.0, 0.01)
    dp.generator = torch.Generator().manual_seed(0)
    dp._params = list(model.parameters())
    dp._samples = _NativeUpdates(model)
    dp._samples.enabled = True
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dp.before_step(None)  # type: ignore[arg-type]
    record: dict = {}
    dp.on_epoch_end(None, record)  # type: ignore[arg-type]
    assert record["clipped_fraction"] == 7 / 11
    assert record["update_norm_mean"] == pytest.approx(sum(norms) / 11, rel=1e-9)
    dp.on_epoch_end(None, record)  # a new epoch starts from zero: no examples seen yet
    assert record["clipped_fraction"] is None
    # clipped means the clip factor min(1, clip / (norm + 1e-6)) is below 1, as in the mechanism
    dp._count_clipped(torch.tensor([clip - 5e-7, clip - 2e-6, clip + 1.0], dtype=torch.float64))
    dp.on_epoch_end(None, record)  # type: ignore[arg-type]
    assert record["clipped_fraction"] == 2 / 3


def test_the_sensitivity_bound_holds_on_real_tensors():
    """Adding or removing one example moves the clipped sum by at most clip; replacing one, by at
    most 2 clip; every clipped per-example update has norm <= clip."""
    model = _net("cnn", "dfa", "all")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 12, 12, generator=gen, dtype=torch.float64) * 5
    y = torch.randint(0, 5, (8,), generator=gen)
    clip = 0.05  # every example is clipped

    def clipped(xs, ys):
        updates = _NativeUpdates(model)
        updates.enabled = True
        F.cross_entropy(model(xs), ys, reduction="mean").backward()
        sums, _ = updates.clipped_sums(clip)
        return torch.cat([sums[p].flatten() for p in model.parameters()])

    _, norms = _explicit_clipped_sum(model, x, y, clip)
    assert min(norms) > clip
    whole = clipped(x, y)
    removed = clipped(x[1:], y[1:])
    replaced = clipped(torch.cat([x[:1] * -3, x[1:]]), torch.cat([(y[:1] + 1) % 5, y[1:]]))
    assert (whole - removed).norm() <= clip * (1 + 1e-9)
    assert (whole - removed).norm() == pytest.approx(clip, rel=1e-5)  # the bound is reached
    assert (whole - replaced).norm() <= 2 * clip * (1 + 1e-9)
    single = clipped(x[:1], y[:1])
    assert single.norm() == pytest.approx(clip, rel=1e-5)


def test_native_and_opacus_engines_train_the_same_run(tmp_path):
    config = dict(PRIVATE, method="dfa", scope="all", noise_multiplier=1.0, epochs=1)
    native = train(TrainConfig(**config), tmp_path / "native", progress=False)
    opacus = train(TrainConfig(**config, private_engine="opacus"), tmp_path / "opacus",
                   progress=False)  # fmt: skip
    a = load_checkpoint(tmp_path / "native" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "opacus" / "checkpoint.pt")["model"]
    for k in a:  # the same clip, the same noise draws: the same weights up to summation order
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)
    assert native.history[0]["epsilon"] == opacus.history[0]["epsilon"]
    # the clipping diagnostics: native norms from the layer factors, opacus's from its gradients
    assert native.history[0]["clipped_fraction"] == opacus.history[0]["clipped_fraction"]
    assert native.history[0]["update_norm_mean"] == pytest.approx(
        opacus.history[0]["update_norm_mean"], rel=1e-4
    )


# -- noise ----------------------------------------------------------------------------------------


class _Zero(nn.Module):
    """One wide linear layer whose per-example updates are all zero: only noise remains."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(300, 200)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)


def test_the_noise_has_the_calibrated_standard_deviation():
    model = _Zero()
    dp = DifferentialPrivacy(clip=0.7, delta=1e-5, batch_size=50, noise_multiplier=1.3, seed=4)
    dp.accountant = PrivacyAccountant(1.3, 0.01)
    dp.generator = torch.Generator().manual_seed(4)
    dp._params = list(model.parameters())
    dp._samples = _NativeUpdates(model)
    dp._samples.enabled = True
    x = torch.zeros(6, 300)  # input zero: per-example updates zero (bias: d_i, also zero here)
    loss = (model.fc(x) * 0).sum()
    loss.backward()
    dp.before_step(None)  # type: ignore[arg-type]
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * 50
    expected = 1.3 * 0.7
    assert noise.numel() == 60200
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)


# -- the trainer ------------------------------------------------------------------------------


def test_poisson_batches_vary_around_the_expected_size_and_resume_exactly():
    data = load_dataset("digits").train
    kw = dict(shuffle=True, augment=False, mean=(0.5,), std=(0.25,), seed=5, poisson=True)
    loader = BatchLoader(data, 64, **kw)
    assert len(loader) == round(1438 / 64)
    sizes = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        for _, y in loader:
            sizes.append(len(y))
    assert len(set(sizes)) > 10  # not a fixed batch size
    assert sum(sizes) / len(sizes) == pytest.approx(64, rel=0.03)
    loader.set_epoch(3, start_batch=5)  # resuming mid-epoch gives the same batches
    again = BatchLoader(data, 64, **kw)
    again.set_epoch(3)
    assert [len(y) for _, y in loader] == [len(y) for _, y in list(again)[5:]]


def test_private_run_logs_epsilon_within_target_and_resumes_bit_identically(tmp_path, monkeypatch):
    config = TrainConfig(**PRIVATE, method="bdfa", scope="all", target_epsilon=2.0)
    whole = train(config, tmp_path / "whole", progress=False).history
    assert all(h["epsilon"] <= 2.0 for h in whole)
    assert whole[-1]["epsilon"] > 1.9  # the noise was found for this budget, not far above it
    assert whole[0]["epsilon"] < whole[1]["epsilon"]

    # the clipping counts: one value per epoch, in (0, 1] at this clip, exact across the resume
    assert all(0 < h["clipped_fraction"] <= 1 and h["update_norm_mean"] > 0 for h in whole)
    calls = {"n": 0}
    real = F.cross_entropy

    def interrupting(logits, target, *args, **kwargs):
        if not kwargs and not args:  # training steps (evaluation passes reduction="sum")
            calls["n"] += 1
            if calls["n"] == 30:  # in epoch 2 of 22 steps: a real Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)
    assert train(config, tmp_path / "split", progress=False).interrupted
    monkeypatch.setattr(F, "cross_entropy", real)
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 8)
    saved = (tmp_path / "split" / "checkpoint.pt").read_bytes()
    resumed = train(None, tmp_path / "split", resume=True, progress=False)
    # the same noise, batches and accountant: bit-identical to the uninterrupted run
    assert _strip(resumed.history) == _strip(whole)
    # a checkpoint from before the counts were saved: that epoch's counts are unknown, not partial
    old = torch.load(io.BytesIO(saved), weights_only=True)
    dp = next(c for c in old["callbacks"] if c["name"] == "DifferentialPrivacy")
    del dp["state"]["clip_stats"]
    shutil.rmtree(tmp_path / "split")
    (tmp_path / "split").mkdir()
    shutil.copy(tmp_path / "whole" / "config.json", tmp_path / "split" / "config.json")
    torch.save(old, tmp_path / "split" / "checkpoint.pt")
    again = train(None, tmp_path / "split", resume=True, progress=False).history
    assert again[1]["clipped_fraction"] is None and again[1]["update_norm_mean"] is None
    assert again[1]["test_acc"] == whole[1]["test_acc"]
    with pytest.raises(ValueError, match=r"would spend epsilon .* > the target 2"):
        train(None, tmp_path / "whole", resume=True, progress=False, epochs=4)


def test_dp_sgd_and_dp_dfa_train_on_digits(tmp_path):
    for method in ("bp", "dfa"):
        config = TrainConfig(**dict(PRIVATE, epochs=4), method=method, scope="all",
                             target_epsilon=8.0)  # fmt: skip
        history = train(config, tmp_path / method, progress=False).history
        assert history[-1]["test_acc"] > 0.5, (method, history[-1])  # chance is 0.1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(target_epsilon=0.0), "target_epsilon must be > 0"),
        (dict(target_epsilon=-1.0), "target_epsilon must be > 0"),
        (dict(), "exactly one of target_epsilon and noise_multiplier"),
        (dict(target_epsilon=1.0, noise_multiplier=1.0), "exactly one of"),
        (dict(target_epsilon=1.0, clip=0.0), "clip must be > 0"),
        (dict(target_epsilon=1.0, batch_norm=True), "batch norm mixes the examples"),
        (dict(target_epsilon=1.0, method="dkp"), "dkp learns its feedback"),
        (dict(target_epsilon=1.0, delta=1.0), "delta must be in"),
        (
            dict(target_epsilon=1.0, private_engine="opacus", channels_last=True),
            "opacus computes wrong per-example conv gradients on channels-last",
        ),
    ],
)
def test_bad_private_options_are_refused_when_the_config_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**PRIVATE, **options})


def test_delta_at_or_above_one_over_n_is_refused(tmp_path):
    config = TrainConfig(**{**PRIVATE, "delta": 1e-3}, target_epsilon=3.0)  # 1/1438 = 7e-4
    with pytest.raises(ValueError, match=r"delta 0.001 must be below 1/N"):
        train(config, tmp_path / "r", progress=False)


def test_a_user_model_with_batch_norm_is_refused():
    from dfatorch.privacy import check_private_model

    with pytest.raises(ValueError, match="layer '1' is batch norm"):
        check_private_model(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
