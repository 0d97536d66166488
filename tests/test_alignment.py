"""Alignment diagnostics: exact values in known cases, and probes that leave no trace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfatorch
from dfatorch.alignment import gradient_alignment, unit_statistics, weight_alignment
from dfatorch.callbacks import AlignmentProbe, TrainState
from dfatorch.engine import get_rng_states
from dfatorch.train import TrainConfig, read_metrics, train


def regularised_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 16),
        nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 5),
    )  # fmt: skip


def data(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("mode", ["standalone", "during a step"])
def test_bp_aligns_exactly_even_with_dropout(mode):
    """Under BP the delivered gradient IS the true one: cosine 1 at every layer, which also proves
    that both passes drew the same dropout masks."""
    x, t = data()
    model = regularised_cnn()
    engine = dfatorch.attach(model, "bp")
    if mode == "standalone":
        report = gradient_alignment(engine, x, t, F.cross_entropy)
    else:
        before = get_rng_states()
        with engine.recording() as delivered:
            F.cross_entropy(model(x), t).backward()
        report = gradient_alignment(
            engine, x, t, F.cross_entropy, delivered=delivered, rng_state=before
        )
    assert [a.name for a in report] == ["0", "5", "8"]
    for a in report:
        assert a.samples > 0
        assert a.mean == pytest.approx(1.0, abs=1e-6) and a.std == pytest.approx(0.0, abs=1e-6)
        assert a.scale == pytest.approx(1.0, abs=1e-6)


def test_feedback_equal_to_the_transposed_path_aligns_exactly():
    """Linear network with one hidden layer: BP's signal is e W2; with B1 = W2, DFA's e B1 is the
    same vector, so alignment is 1 and the weight angle 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    x, t = torch.randn(10, 6), torch.randint(0, 3, (10,))
    engine = dfatorch.attach(model, "dfa", example_input=x)
    with torch.no_grad():
        engine.feedback.pattern.copy_(model[1].weight)
        engine.feedback.scales.fill_(1.0)
    (a,) = gradient_alignment(engine, x, t, F.cross_entropy)
    assert a.mean == pytest.approx(1.0, abs=1e-6)
    assert a.weight_angle == pytest.approx(0.0, abs=1e-2)
    with torch.no_grad():
        engine.feedback.pattern.copy_(-model[1].weight)
    (a,) = gradient_alignment(engine, x, t, F.cross_entropy)
    assert a.mean == pytest.approx(-1.0, abs=1e-6)
    assert weight_alignment(engine)["0"] == pytest.approx(180.0, abs=1e-2)


def test_signal_scale_and_unit_statistics_against_explicit_formulas():
    """float64, one hidden ReLU layer with two units dead by construction: the scale is the
    median over samples of |e_i B| / |e_i W2| (DFA's signal over BP's at the hidden output), the
    dead fraction 2/5 and the norm the mean of |relu(W1 x_i + b1)|."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].bias[:2] = -100.0
    x, t = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    engine = dfatorch.attach(model, "dfa", example_input=x)
    (a,) = gradient_alignment(engine, x, t, F.cross_entropy)
    (b,) = engine.feedback.blocks()
    with torch.no_grad():
        h = torch.relu(model[0](x))
        e = (torch.softmax(model[2](h), 1) - F.one_hot(t, 3).double()) / len(t)
    ratios = (e @ b.double()).norm(dim=1) / (e @ model[2].weight).norm(dim=1)
    assert a.scale == pytest.approx(ratios.quantile(0.5).item(), rel=1e-12)
    assert a.samples == 9
    dead, norm = unit_statistics(h)
    assert dead == pytest.approx(2 / 5)
    assert norm == pytest.approx(h.norm(dim=1).mean().item(), rel=1e-12)
    # a unit that is zero for some samples only is alive; an all-zero output is all dead
    assert unit_statistics(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))[0] == 0.0
    assert unit_statistics(torch.zeros(3, 4)) == (1.0, 0.0)


@pytest.mark.parametrize("loss_scale", [1.0, 2.5])
def test_probe_logs_each_layers_output_statistics_and_undoes_a_loss_scale(tmp_path, loss_scale):
    """The training probe's ``dead`` and ``norm`` are those of each hidden layer's own output
    (layers of different widths, recomputed by a plain forward pass), and its ``scale`` is the
    standalone one also when the loss was scaled before backward (a data-parallel shard's share)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3)
    ).double()
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # 3 of 7 dead in the first layer, none forced in the second
    x, t = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    engine = dfatorch.attach(model, "dfa", example_input=x)
    probe = AlignmentProbe(1)
    state = TrainState(
        config=TrainConfig(), run_dir=tmp_path, model=model, engine=engine, optimizer=None,
        loss_fn=F.cross_entropy, steps_per_epoch=1,
    )  # fmt: skip
    state.x, state.y, state.loss_scale = x, t, loss_scale
    with probe.step_context(state):
        (F.cross_entropy(model(x), t) * loss_scale).backward()
    probe.after_backward(state)
    logged = state.partial["alignment"][0]["layers"]
    with torch.no_grad():
        h1 = torch.relu(model[0](x))
        h2 = torch.relu(model[2](h1))
    for name, h in (("0", h1), ("2", h2)):
        dead, norm = unit_statistics(h)
        assert logged[name]["dead"] == dead and logged[name]["norm"] == pytest.approx(norm)
    assert logged["0"]["dead"] == pytest.approx(3 / 7)
    assert logged["0"]["norm"] != pytest.approx(logged["2"]["norm"])
    standalone = gradient_alignment(engine, x, t, F.cross_entropy)
    for a in standalone:
        assert logged[a.name]["scale"] == pytest.approx(a.scale, rel=1e-9)


def test_untrained_dfa_with_random_feedback_is_near_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                          nn.Linear(512, 10))  # fmt: skip
    x, t = torch.randn(256, 100), torch.randint(0, 10, (256,))
    engine = dfatorch.attach(model, "dfa")
    report = gradient_alignment(engine, x, t, F.cross_entropy)
    for a in report:
        assert abs(a.mean) < 0.1, a
    assert 60 < report[-1].weight_angle < 120  # random high-dimensional vectors: ~90 degrees


def test_probe_leaves_model_optimizer_and_rng_bit_identical():
    x, t = data()
    model = regularised_cnn()
    engine = dfatorch.attach(model, "bdfa", scope="all")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    F.cross_entropy(model(x), t).backward()
    opt.step()  # non-trivial optimiser state and .grad
    state, optim = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    feedback = copy.deepcopy(engine.state_dict())
    rng = torch.get_rng_state()
    gradient_alignment(engine, x, t, F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    new_optim = opt.state_dict()
    for k, v in optim["state"].items():
        for name, tensor in v.items():
            assert torch.equal(new_optim["state"][k][name], tensor)
    assert all(torch.equal(v, feedback[k]) for k, v in engine.state_dict().items() if
               isinstance(v, torch.Tensor))  # fmt: skip


def test_training_with_probes_is_unchanged_and_logs_alignment(tmp_path):
    base = dict(dataset="digits", model="mlp", width=0.1, dropout=0.2, epochs=2, batch_size=32,
                method="dfa", scope="all")  # fmt: skip
    plain = train(TrainConfig(**base), tmp_path / "plain", progress=False).history
    probed = train(TrainConfig(**base, align_every=10), tmp_path / "probed", progress=False).history
    for a, b in zip(plain, probed):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == b[key]
    probes = read_metrics(tmp_path / "probed")[0]["alignment"]
    assert [p["step"] for p in probes] == list(range(0, 45, 10))
    assert set(probes[0]["layers"]) == {"1", "4"}
    assert all(-1 <= layer["mean"] <= 1 for p in probes for layer in p["layers"].values())
    for p in probes:  # tanh units are never exactly zero; the other fields are logged per layer
        for layer in p["layers"].values():
            assert layer["dead"] == 0.0 and layer["norm"] > 0 and layer["scale"] > 0


def test_probe_plots_and_tables_read_records_from_before_the_new_fields(tmp_path):
    """Records with only the alignment (older runs) still plot, with one row per logged field,
    and the report's per-field reader returns nothing for a field they lack."""
    from dfatorch.plots import alignment_series, plot_probes
    from dfatorch.report import _final_alignment

    old = [{"alignment": [{"step": s, "layers": {"1": {"mean": 0.1 * s, "std": 0.0}}}
                          for s in (0, 10)]}]  # fmt: skip
    new = [{"alignment": [{"step": 0, "layers": {"1": {"mean": 0.5, "std": 0.1, "scale": 2.0,
                                                      "dead": 0.0, "norm": 0.0}}}]}]  # fmt: skip
    assert alignment_series(old, "scale") == {}
    assert alignment_series(old)["1"] == ([0, 10], [0.0, 1.0], [0.0, 0.0])
    assert _final_alignment(old, "dead") == {} and _final_alignment(old) == {"1": 0.5}
    assert plot_probes({"old": old}, tmp_path / "old.png").stat().st_size > 5_000
    assert plot_probes({"old": old, "new": new}, tmp_path / "both.png") is not None
    assert plot_probes({"none": [{"epoch": 1}]}, tmp_path / "none.png") is None
    with pytest.raises(ValueError, match="unknown probe fields"):
        plot_probes({"old": old}, tmp_path / "x.png", fields=("angle",))
