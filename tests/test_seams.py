"""The seams every method plugs into: feedback structures from outside the package, error and
signal transforms checked against the explicit DFA formula, copies of attached models, and the
feedback matrix's invariants (scales, storages over many steps, its cache)."""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from test_engine import batch, make_cnn, make_mlp, output_error, step
from torch import nn

import dfatorch
from dfatorch.engine import attached_engine
from dfatorch.feedback import PATTERNS, Pattern, register_pattern
from dfatorch.transforms import GaussianNoise, RandomTransform


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tanh_mlp_forward(model: nn.Sequential, x: torch.Tensor):
    lin = [m for m in model if isinstance(m, nn.Linear)]
    hs = [x]
    for layer in lin[:-1]:
        hs.append(torch.tanh(hs[-1] @ layer.weight.T + layer.bias))
    return lin, hs, hs[-1] @ lin[-1].weight.T + lin[-1].bias


# -- error and signal transforms, written as a user would ---------------------------------------


def clip_rows(e: torch.Tensor, max_norm: float = 0.05) -> torch.Tensor:
    """Per-example clipping of the output error: a plain function is a transform."""
    return e * (max_norm / e.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


class RecordedNoise(RandomTransform):
    """Adds N(0, 0.01^2) noise from the transform's saved generator, and keeps what it added."""

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        g = self.generator(signal.device)
        self.added = torch.randn(signal.shape, generator=g, dtype=signal.dtype) * 0.01
        return signal + self.added


def test_transforms_from_outside_match_the_explicit_formula():
    x, t = batch()
    model, noise = make_mlp(), RecordedNoise(seed=3)
    engine = dfatorch.attach(
        model, "dfa", error_transforms=[clip_rows], signal_transforms=[noise], example_input=x
    )
    got = step(model, x, t)
    with torch.no_grad():
        _, hs, y = tanh_mlp_forward(model, x)
        e = output_error(y, t)
        clipped = clip_rows(e)
        assert (clipped.norm(dim=1) < e.norm(dim=1) - 1e-9).any()  # the clip is active here
        signal = clipped @ engine.feedback.matrix(torch.float64) + noise.added
        for i, s in enumerate(signal.split(engine.feedback.sizes, 1)):
            delta = s * (1 - hs[i + 1] ** 2)
            torch.testing.assert_close(got[f"{2 * i}.weight"], delta.T @ hs[i])
            torch.testing.assert_close(got[f"{2 * i}.bias"], delta.sum(0))
        # the output layer keeps its true gradient, untouched by either transform
        torch.testing.assert_close(got["6.weight"], e.T @ hs[-1], rtol=0, atol=1e-15)
        torch.testing.assert_close(got["6.bias"], e.sum(0), rtol=0, atol=1e-15)


def test_random_transform_state_resumes_exactly():
    x, t = batch()
    model = make_mlp()
    engine = dfatorch.attach(model, "dfa", signal_transforms=[GaussianNoise(0.1, seed=5)])
    step(model, x, t)
    state = engine.state_dict()
    after = step(model, x, t)  # the second draw of the noise
    other = make_mlp()
    resumed = dfatorch.attach(other, "dfa", signal_transforms=[GaussianNoise(0.1, seed=5)])
    resumed.load_state_dict(state)
    again = step(other, x, t)
    for name in after:
        assert torch.equal(after[name], again[name]), name
    fresh = make_mlp()  # without the saved state: the first draw again, another gradient
    dfatorch.attach(fresh, "dfa", signal_transforms=[GaussianNoise(0.1, seed=5)])
    assert not torch.equal(step(fresh, x, t)["0.weight"], after["0.weight"])


# -- a feedback structure from outside the package ----------------------------------------------


class SparseSigns(Pattern):
    """Random signs on a random ``density`` share of the entries, zeros elsewhere."""

    name = "test_sparse_signs"
    params: ClassVar[dict[str, float]] = {"density": 0.5}

    def sample(self, num_classes, d, *, generator, binary):
        signs = torch.randint(0, 2, (num_classes, d), generator=generator).float() * 2 - 1
        keep = torch.rand(num_classes, d, generator=generator) < self.options["density"]
        return signs * keep / (1 if binary else math.sqrt(d * self.options["density"]))


@pytest.fixture
def sparse_registered():
    register_pattern(SparseSigns)
    yield
    PATTERNS.pop(SparseSigns.name)


def test_new_structure_trains_saves_and_reloads(sparse_registered):
    x, _ = batch(n=64, seed=2)
    t = (x @ torch.randn(12, 5, generator=torch.Generator().manual_seed(0))).argmax(1)  # a teacher
    model = make_mlp()
    engine = dfatorch.attach(model, "bdfa", init=SparseSigns(density=0.25), seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it trains
    pattern = engine.feedback.full_pattern()
    assert 0.15 < (pattern != 0).double().mean() < 0.35
    assert engine.feedback.layout()["init_options"] == {"density": 0.25}
    state = engine.state_dict()

    other = make_mlp(seed=5)  # by name, before the first pass: rebuilt from the saved layout
    reloaded = dfatorch.attach(other, "bdfa", init="test_sparse_signs", seed=1)
    reloaded.load_state_dict(state)
    assert reloaded.feedback.structure.options == {"density": 0.25}
    assert torch.equal(reloaded.feedback.matrix(), engine.feedback.matrix())

    # a built matrix with other options refuses the checkpoint, naming the difference
    mismatch = dfatorch.attach(make_mlp(), "bdfa", init=SparseSigns(density=0.5), seed=1)
    mismatch.materialize(x)
    with pytest.raises(ValueError, match="init_options"):
        mismatch.load_state_dict(state)


def test_structure_options_are_checked():
    with pytest.raises(ValueError, match="no option"):
        SparseSigns(sparsity=0.1)
    with pytest.raises(ValueError, match="init='nope' is not one of"):
        dfatorch.attach(make_mlp(), "dfa", init="nope")


# -- copies of an attached model ------------------------------------------------------------------


@pytest.mark.parametrize("before_first_pass", [False, True])
def test_deepcopy_trains_with_its_own_engine(before_first_pass):
    x, t = batch(shape=(2, 8, 8))
    model = make_cnn()
    engine = dfatorch.attach(model, "bdfa", scope="all", seed=2)
    if not before_first_pass:
        step(model, x, t)
    twin = copy.deepcopy(model)
    twin_engine = attached_engine(twin)
    assert twin_engine is not None and twin_engine is not engine
    assert twin_engine.model is twin
    layers = [twin.conv1, twin.conv2, twin.fc1, twin.fc2, twin.out]
    assert all(a.module is b for a, b in zip(twin_engine.layers, layers, strict=True))
    want = step(model, x, t)
    got = step(twin, x, t)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    plain = make_cnn()
    plain.load_state_dict(twin.state_dict())
    assert not torch.equal(step(plain, x, t)["conv1.weight"], got["conv1.weight"])  # not BP
    twin_engine.remove()  # removing the copy's engine leaves the original attached
    assert engine.attached and not twin_engine.attached
    assert torch.equal(step(model, x, t)["conv1.weight"], want["conv1.weight"])
    assert torch.equal(step(twin, x, t)["conv1.weight"], step(plain, x, t)["conv1.weight"])


def test_attach_twice_is_refused_also_on_a_copy():
    model = make_mlp()
    dfatorch.attach(model, "dfa")
    with pytest.raises(ValueError, match="already attached"):
        dfatorch.attach(copy.deepcopy(model), "dfa")


# -- invariants of the feedback matrix -------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("init", ["uniform", "gaussian"])
def test_binary_scale_is_gain_times_the_float_entry_rms(init, normalize):
    """s_l = gain * RMS(float entries of the init) (* sqrt(d) without normalisation)."""
    x, _ = batch()
    engine = dfatorch.attach(
        make_mlp(), "bdfa", init=init, gain=1.7, normalize=normalize, example_input=x
    )
    c = 5
    for d, s in zip(engine.feedback.sizes, engine.feedback.scales.tolist()):
        rms = 1 / math.sqrt(3 * d) if init == "uniform" else 1 / math.sqrt(c * d)
        want = 1.7 * rms * (1 if normalize else math.sqrt(d))
        assert s == pytest.approx(want, rel=1e-6)
        # and the float pattern of the same init has that RMS
        from dfatorch.feedback import sample_pattern

        drawn = sample_pattern(init, c, 4000, seed=0, binary=False)
        expected = 1 / math.sqrt(3 * 4000) if init == "uniform" else 1 / math.sqrt(c * 4000)
        assert drawn.pow(2).mean().sqrt().item() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("storage", ["packed", "seeded"])
def test_storages_match_dense_over_many_steps(storage):
    x, t = batch(n=16, shape=(2, 8, 8), seed=3)
    models = {s: make_cnn() for s in ("dense", storage)}
    opts = {}
    for s, model in models.items():
        dfatorch.attach(model, "bdfa", scope="all", storage=s, seed=7)
        opts[s] = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(6):
        for s, model in models.items():
            opts[s].zero_grad()
            F.cross_entropy(model(x), t).backward()
            opts[s].step()
        for (name, a), b in zip(
            models["dense"].named_parameters(), models[storage].parameters(), strict=True
        ):
            assert torch.equal(a, b), name


def test_matrix_cache_survives_dtype_round_trips():
    """The cached dense B must follow the buffers through double()/float() and in-place changes,
    however the allocator reuses memory."""
    x, _ = batch()
    engine = dfatorch.attach(make_mlp(), "dfa", example_input=x)
    fb = engine.feedback
    for i in range(2000):
        fb.matrix()
        fb.double()
        with torch.no_grad():
            fb.scales.fill_(1.0 + (i % 7))
        fb.float()
        want = fb.pattern * fb.scales.repeat_interleave(torch.tensor(fb.sizes))
        assert torch.equal(fb.matrix(), want), i
