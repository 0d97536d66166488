"""The engine's gradients against explicit formulas, computed here independently of the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dfatorch
from dfatorch import FeedbackInit, Storage


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Exact comparisons in float64 for this module's tests; restored afterwards."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make_mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), act(), nn.Linear(16, 14), act(), nn.Linear(14, 10), act(),
        nn.Linear(10, 5),
    )  # fmt: skip


class SmallCNN(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> pool -> flatten -> fc -> relu -> fc -> relu -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 9)
        self.out = nn.Linear(9, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return F.max_pool2d(F.relu(self.conv2(h)), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(h)))))


def make_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


def batch(n: int = 7, shape: tuple[int, ...] = (12,), classes: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def step(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), t).backward()
    return grads(model)


def output_error(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """e = dL/dy of the mean cross-entropy: (softmax - onehot) / N."""
    return (logits.softmax(1) - F.one_hot(t, logits.shape[1])) / logits.shape[0]


def tanh_mlp_manual(model: nn.Sequential, x: torch.Tensor, t: torch.Tensor, blocks):
    """Explicit DFA weight gradients of the tanh MLP: dW_l = ((e B_l) * f'(a_l))^T h_{l-1}."""
    lin = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        hs = [x]
        for layer in lin[:-1]:
            hs.append(torch.tanh(hs[-1] @ layer.weight.T + layer.bias))
        y = hs[-1] @ lin[-1].weight.T + lin[-1].bias
        e = output_error(y, t)
        out = {}
        for i, b in enumerate(blocks):
            delta = (e @ b) * (1 - hs[i + 1] ** 2)
            out[i] = (delta.T @ hs[i], delta.sum(0))
        out[len(lin) - 1] = (e.T @ hs[-1], e.sum(0))
    return out


# -- back-propagation is untouched -------------------------------------------------------------


@pytest.mark.parametrize("factory", [make_mlp, make_cnn])
def test_bp_through_engine_equals_autograd(factory):
    x, t = batch(shape=(2, 8, 8)) if factory is make_cnn else batch()
    plain, hooked = factory(), factory()
    engine = dfatorch.attach(hooked, "bp")
    want, got = step(plain, x, t), step(hooked, x, t)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert engine.feedback is None and engine.feedback_layers == []


def test_remove_restores_exact_bp():
    x, t = batch()
    plain, model = make_mlp(), make_mlp()
    engine = dfatorch.attach(model, "dfa")
    dfa_grads = step(model, x, t)
    want = step(plain, x, t)
    assert not torch.allclose(dfa_grads["0.weight"], want["0.weight"])
    engine.remove()
    got = step(model, x, t)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert not engine.attached
    dfatorch.attach(model, "dfa")  # a new engine may attach once the old one is removed


# -- DFA and BDFA against the explicit formula ------------------------------------------------


@pytest.mark.parametrize("method", ["dfa", "bdfa"])
@pytest.mark.parametrize(
    "init", [i.value for i in FeedbackInit if i is not FeedbackInit.NORM_MATCHED]
)
def test_mlp_weight_gradients_match_formula(method, init):
    x, t = batch()
    model = make_mlp()
    engine = dfatorch.attach(model, method, init=init, seed=3)
    got = step(model, x, t)
    blocks = engine.feedback.blocks(torch.float64)
    assert [b.shape for b in blocks] == [(5, 16), (5, 14), (5, 10)]
    want = tanh_mlp_manual(model, x, t, blocks)
    for i, name in enumerate(["0", "2", "4", "6"]):
        torch.testing.assert_close(got[f"{name}.weight"], want[i][0])
        torch.testing.assert_close(got[f"{name}.bias"], want[i][1])
    if method == "bdfa":  # B_l takes exactly the values -s_l and +s_l
        for b, s in zip(blocks, engine.feedback.scales):
            assert set(b.abs().unique().tolist()) == {s.item()}


def cnn_manual(model: SmallCNN, x, t, rules: dict[str, str], blocks, conv_error="backprop"):
    """Explicit gradients of SmallCNN under per-layer rules, written out layer by layer.

    ``blocks`` maps a layer name to its B_l. Max-pool backward routes the error to the argmax
    (max_unpool2d with the forward's indices); ReLU's derivative is (a > 0).
    """
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        a1 = F.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=1)
        p1, i1 = F.max_pool2d(F.relu(a1), 2, return_indices=True)
        a2 = F.conv2d(p1, w["conv2.weight"], w["conv2.bias"], padding=1)
        p2, i2 = F.max_pool2d(F.relu(a2), 2, return_indices=True)
        f = p2.flatten(1)
        a3 = f @ w["fc1.weight"].T + w["fc1.bias"]
        h3 = F.relu(a3)
        a4 = h3 @ w["fc2.weight"].T + w["fc2.bias"]
        h4 = F.relu(a4)
        y = h4 @ w["out.weight"].T + w["out.bias"]
        e = output_error(y, t)

        def signal(layer, bp_error):  # error at a layer's output (after nonlinearity/pooling)
            return e @ blocks[layer] if rules[layer] != "bp" else bp_error

        d_out = e
        g4 = signal("fc2", d_out @ w["out.weight"])
        d4 = g4 * (a4 > 0)
        g3 = signal("fc1", d4 @ w["fc2.weight"])
        d3 = g3 * (a3 > 0)
        gf = signal("conv2", d3 @ w["fc1.weight"]).view_as(p2)
        d2 = F.max_unpool2d(gf, i2, 2, output_size=a2.shape[-2:]) * (a2 > 0)
        bp1 = torch.nn.grad.conv2d_input(p1.shape, w["conv2.weight"], d2, padding=1)
        gp1 = signal("conv1", bp1).reshape(p1.shape)
        d1 = F.max_unpool2d(gp1, i1, 2, output_size=a1.shape[-2:]) * (a1 > 0)
        return {
            "conv1.weight": torch.nn.grad.conv2d_weight(x, w["conv1.weight"].shape, d1, padding=1),
            "conv1.bias": d1.sum((0, 2, 3)),
            "conv2.weight": torch.nn.grad.conv2d_weight(p1, w["conv2.weight"].shape, d2, padding=1),
            "conv2.bias": d2.sum((0, 2, 3)),
            "fc1.weight": d3.T @ f,
            "fc1.bias": d3.sum(0),
            "fc2.weight": d4.T @ h3,
            "fc2.bias": d4.sum(0),
            "out.weight": d_out.T @ h4,
            "out.bias": d_out.sum(0),
        }


CNN_CASES = {
    # (method, scope, conv_error) -> rule per hidden layer
    ("dfa", "all", "backprop"): {"conv1": "dfa", "conv2": "dfa", "fc1": "dfa", "fc2": "dfa"},
    ("bdfa", "all", "backprop"): {"conv1": "bdfa", "conv2": "bdfa", "fc1": "bdfa", "fc2": "bdfa"},
    ("dfa", "fc", "backprop"): {"conv1": "bp", "conv2": "bp", "fc1": "dfa", "fc2": "dfa"},
    ("bdfa", "fc", "backprop"): {"conv1": "bp", "conv2": "bp", "fc1": "bdfa", "fc2": "bdfa"},
    ("dfa", "fc", "project"): {"conv1": "bp", "conv2": "dfa", "fc1": "dfa", "fc2": "dfa"},
    ("bdfa", "fc", "project"): {"conv1": "bp", "conv2": "bdfa", "fc1": "bdfa", "fc2": "bdfa"},
}


@pytest.mark.parametrize("case", list(CNN_CASES), ids=lambda c: "-".join(c))
def test_cnn_gradients_match_formula(case):
    method, scope, conv_error = case
    x, t = batch(n=6, shape=(2, 8, 8))
    model = make_cnn()
    engine = dfatorch.attach(model, method, scope=scope, conv_error=conv_error, seed=5)
    rules = CNN_CASES[case]
    assert {k: v.value for k, v in engine.rules.items() if k != "out"} == rules
    got = step(model, x, t)
    names = engine.feedback.names
    blocks = dict(zip(names, engine.feedback.blocks(torch.float64)))
    # the conv feedback is dense over C x H x W, not tiled: one column per unit of the map
    if "conv1" in blocks:
        assert blocks["conv1"].shape == (5, 4 * 4 * 4)
    want = cnn_manual(model, x, t, rules, blocks)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


def test_hybrid_conv_gradients_are_backprop_of_the_top_error():
    """Option (a): the conv stack's gradients equal autograd's back-propagation of the error
    W_fc1^T delta_1 from its top; option (b): of e @ B_conv. Checked with autograd on a copy."""
    x, t = batch(n=6, shape=(2, 8, 8))
    for conv_error in ("backprop", "project"):
        model = make_cnn()
        engine = dfatorch.attach(model, "dfa", scope="fc", conv_error=conv_error, seed=2)
        got = step(model, x, t)
        blocks = dict(zip(engine.feedback.names, engine.feedback.blocks(torch.float64)))
        ref = copy.deepcopy(make_cnn())
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            f = ref.features(x).flatten(1)
            a3 = f @ ref.fc1.weight.T + ref.fc1.bias
            h3 = F.relu(a3)
            a4 = h3 @ ref.fc2.weight.T + ref.fc2.bias
            y = ref.out(F.relu(a4))
            e = output_error(y, t)
            if conv_error == "backprop":
                top = ((e @ blocks["fc1"]) * (a3 > 0)) @ ref.fc1.weight
            else:
                top = e @ blocks["conv2"]
        conv_params = [ref.conv1.weight, ref.conv1.bias, ref.conv2.weight, ref.conv2.bias]
        want = torch.autograd.grad(ref.features(x).flatten(1), conv_params, grad_outputs=top)
        for name, w in zip(["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"], want):
            torch.testing.assert_close(got[name], w)


# -- what is (not) computed --------------------------------------------------------------------


class MatmulCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("method", "expected"), [("bp", 4 + 3), ("dfa", 4 + 1), ("bdfa", 4 + 1)])
def test_backward_matmuls(method, expected):
    """BP's backward: 4 weight gradients + 3 input gradients. DFA's: 4 weight gradients + ONE
    projection for all three hidden layers, and no W^T delta product."""
    x, t = batch(n=7)
    model = make_mlp()
    dfatorch.attach(model, method)
    loss = F.cross_entropy(model(x), t)
    with MatmulCounter() as counter:
        loss.backward()
    assert len(counter.shapes) == expected, counter.shapes
    if method != "bp":
        assert ((7, 5), (5, 16 + 14 + 10)) in counter.shapes  # e @ [B_1 | B_2 | B_3]


def test_no_grad_forward_is_untouched():
    x, _ = batch()
    plain, model = make_mlp(), make_mlp()
    engine = dfatorch.attach(model, "bdfa")
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert engine.feedback is None  # nothing was built or stashed for evaluation


# -- storage and state --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "init", [i.value for i in FeedbackInit if i is not FeedbackInit.NORM_MATCHED]
)
def test_packed_and_seeded_give_bit_identical_gradients(init):
    x, t = batch(n=9, shape=(2, 8, 8))
    results = {}
    for storage in Storage:
        model = make_cnn()
        engine = dfatorch.attach(model, "bdfa", scope="all", init=init, storage=storage, seed=4)
        results[storage] = (step(model, x, t), engine)
    dense = results[Storage.DENSE][0]
    for storage in (Storage.PACKED, Storage.SEEDED):
        for name, g in results[storage][0].items():
            assert torch.equal(g, dense[name]), (storage, name)
    c, d = 5, results[Storage.DENSE][1].feedback.total_size
    sizes = {s: results[s][1].storage_bytes()["pattern"] for s in Storage}
    assert sizes[Storage.DENSE] == 4 * c * d  # the pattern is kept in float32
    assert sizes[Storage.PACKED] == c * -(-d // 8)
    assert sizes[Storage.SEEDED] == 0


def test_packed_needs_binary_feedback():
    with pytest.raises(ValueError, match="packed storage"):
        dfatorch.attach(make_mlp(), "dfa", storage="packed", example_input=batch()[0])


def test_pack_unpack_round_trip():
    from dfatorch.feedback import pack_signs, unpack_signs

    signs = torch.randint(0, 2, (3, 21)).double() * 2 - 1
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 3)
    assert torch.equal(unpack_signs(packed, 21, torch.float64), signs)


@pytest.mark.parametrize("storage", [s.value for s in Storage])
def test_state_dict_round_trip_restores_feedback_exactly(storage):
    x, t = batch()
    model = make_mlp()
    engine = dfatorch.attach(model, "bdfa", storage=storage, seed=11, example_input=x)
    engine.feedback.scales.mul_(1.7)  # a calibrated state must survive too
    state = engine.state_dict()
    want = engine.feedback.matrix()
    # a fresh engine with another seed, not yet built: load before the first pass
    other = make_mlp()
    fresh = dfatorch.attach(other, "bdfa", storage=storage, seed=99)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.feedback.matrix(), want)
    other.load_state_dict(model.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(step(other, x, t).values(), step(model, x, t).values())
    )


def test_state_dict_refuses_other_layout():
    x, _ = batch()
    engine = dfatorch.attach(make_mlp(), "bdfa", example_input=x)
    other = dfatorch.attach(make_mlp(), "bdfa", init="balanced", example_input=x)
    with pytest.raises(ValueError, match="init"):
        other.load_state_dict(engine.state_dict())
    fc_engine = dfatorch.attach(make_cnn(), "dfa", scope="fc")
    with pytest.raises(ValueError, match="rules"):
        fc_engine.load_state_dict(dfatorch.attach(make_cnn(), "dfa").state_dict())


def test_feedback_follows_model_dtype_and_engine_to():
    x, t = batch()
    model = make_mlp().float()
    engine = dfatorch.attach(model, "dfa")
    step(model, x.float(), t)
    assert engine.feedback.pattern.dtype == torch.float32
    engine.to(torch.float64)
    assert engine.feedback.pattern.dtype == torch.float64
    assert engine.feedback.scales.device == next(model.parameters()).device


# -- feedback initialisations ---------------------------------------------------------------


def test_feedback_init_properties():
    from dfatorch.feedback import sample_pattern

    c, d = 10, 64
    u = sample_pattern("uniform", c, d, seed=0, binary=False)
    assert u.abs().max() <= d**-0.5
    g = sample_pattern("gaussian", 10, 4000, seed=0, binary=False)
    assert abs(g.var().item() * 10 * 4000 - 1) < 0.05
    o = sample_pattern("orthogonal", c, d, seed=0, binary=False).double()
    gram = o @ o.T
    torch.testing.assert_close(gram - torch.diag(gram.diag()), torch.zeros(c, c), atol=1e-6, rtol=0)
    ob = sample_pattern("orthogonal", c, d, seed=0, binary=True)  # 16 divides 64
    assert set(ob.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(ob @ ob.T, d * torch.eye(c))
    assert torch.equal(ob.sum(1), torch.zeros(c))
    bb = sample_pattern("balanced", c, 70, seed=0, binary=True)
    assert torch.equal(bb.sum(0), torch.zeros(70)) and torch.equal(bb.sum(1), torch.zeros(c))
    bf = sample_pattern("balanced", c, d, seed=0, binary=False).double()
    torch.testing.assert_close(bf.mean(0), torch.zeros(d), atol=1e-6, rtol=0)
    torch.testing.assert_close(bf.mean(1), torch.zeros(c), atol=1e-6, rtol=0)
    again = sample_pattern("orthogonal", c, d, seed=0, binary=True)
    assert torch.equal(ob, again)  # deterministic in the seed
    assert not torch.equal(ob, sample_pattern("orthogonal", c, d, seed=1, binary=True))


def test_norm_matched_calibration_and_probe_leaves_no_trace():
    x, t = batch(n=16)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 14),
        nn.Tanh(), nn.Linear(14, 5),
    )  # fmt: skip
    engine = dfatorch.attach(model, "bdfa", init="norm_matched")
    with pytest.raises(RuntimeError, match="calibrate"):
        F.cross_entropy(model(x), t).backward()
    model.zero_grad(set_to_none=True)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    engine.calibrate(x, t, F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # on the calibration batch, the projected signal has the norm of BP's gradient
    torch.set_rng_state(rng)
    error, true = engine.true_signals(x, t, F.cross_entropy)
    for delivered, exact in zip(engine.feedback.project(error), true):
        torch.testing.assert_close(delivered.norm(), exact.norm())
    F.cross_entropy(model(x), t).backward()  # calibrated: training may start


def test_dfa_learns():
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    t = (x @ torch.randn(12, 5)).argmax(1)
    model = make_mlp(act=nn.Tanh)
    dfatorch.attach(model, "bdfa", scope="all")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert (model(x).argmax(1) == t).double().mean() > 0.8


# -- errors --------------------------------------------------------------------------------------


def test_errors_name_the_cause():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        dfatorch.attach(lambda x: x, "dfa")
    with pytest.raises(ValueError, match="no layer"):
        dfatorch.attach(nn.Sequential(nn.ReLU()), "dfa")
    with pytest.raises(ValueError, match="single layer"):
        dfatorch.attach(nn.Linear(3, 2), "dfa")
    with pytest.raises(ValueError, match="method='sgd'"):
        dfatorch.attach(make_mlp(), "sgd")
    with pytest.raises(ValueError, match="scope="):
        dfatorch.attach(make_mlp(), "dfa", scope="conv")
    with pytest.raises(ValueError, match="no hidden layer gets a DFA rule"):
        dfatorch.attach(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)), "dfa",
                        scope="fc")  # fmt: skip
    emb = nn.Sequential(
        nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    )
    with pytest.raises(ValueError, match=r"'0' \(Embedding\)"):
        dfatorch.attach(emb, "dfa")
    dfatorch.attach(emb, "dfa", rules={"0": "bp"})  # accepted when said explicitly
    with pytest.raises(ValueError, match="output layer"):
        dfatorch.attach(make_mlp(), "dfa", rules={"6": "dfa"})
    with pytest.raises(ValueError, match="matches no layer"):
        dfatorch.attach(make_mlp(), "dfa", rules={"fc9": "bp"})
    model = make_mlp()
    dfatorch.attach(model, "dfa")
    with pytest.raises(ValueError, match="already attached"):
        dfatorch.attach(model, "dfa")


def test_runtime_errors_name_the_cause():
    x, t = batch()
    model = make_mlp()
    engine = dfatorch.attach(model, "dfa")
    with pytest.raises(ValueError, match="scalar"):
        engine.calibrate(x, t, lambda y, t: F.cross_entropy(y, t, reduction="none"))
    conv_out = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Unflatten(1, (6, 1)), nn.Conv1d(6, 3, 1)
    )
    dfatorch.attach(conv_out, "dfa")
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        conv_out(torch.randn(2, 4))
    mismatch = make_mlp()
    eng = dfatorch.attach(mismatch, "dfa", example_input=x)
    eng.num_classes = 6  # feedback for 6 outputs, the model gives 5
    with pytest.raises(ValueError, match="5 units but the feedback is for 6"):
        mismatch(x)
    # a feedback point whose size changes with the input (conv map before global pooling)
    conv = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    dfatorch.attach(conv, "dfa", example_input=torch.randn(2, 1, 6, 6))
    with pytest.raises(
        ValueError, match="has 50 units per sample, but its feedback was built for 72"
    ):
        conv(torch.randn(2, 1, 5, 5))


class OutOfOrder(nn.Module):
    """Layers registered in another order than they run: b, a, c; runs a, b, c."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(6, 3)
        self.a = nn.Linear(4, 6)
        self.c = nn.Linear(3, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_execution_order_from_example_input():
    torch.manual_seed(0)
    model = OutOfOrder()
    dfatorch.attach(model, "dfa")
    with pytest.raises(RuntimeError, match="registration order"):
        model(torch.randn(2, 4))
    model = OutOfOrder()
    engine = dfatorch.attach(model, "dfa", example_input=torch.randn(2, 4))
    assert [i.name for i in engine.layers] == ["a", "b", "c"]
    assert engine.feedback.sizes == [6, 3]
    x, t = torch.randn(5, 4), torch.randint(0, 2, (5,))
    got = step(model, x, t)
    with torch.no_grad():
        h1 = torch.tanh(model.a(x))
        h2 = torch.tanh(model.b(h1))
        e = output_error(model.c(h2), t)
        b1, b2 = engine.feedback.blocks(torch.float64)
        torch.testing.assert_close(got["a.weight"], ((e @ b1) * (1 - h1**2)).T @ x)
        torch.testing.assert_close(got["b.weight"], ((e @ b2) * (1 - h2**2)).T @ h1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(h)) + h)  # skips around the cut before b


def test_skip_connection_around_a_cut_is_refused():
    with pytest.raises(ValueError, match="bypasses its cut"):
        dfatorch.attach(Residual(), "dfa", example_input=torch.randn(2, 4))
    dfatorch.attach(Residual(), "dfa", rules={"a": "bp"}, example_input=torch.randn(2, 4))


def test_channels_last_points_get_same_gradients_in_their_layout():
    """The projection follows each point's memory layout (no N x D copy) and B's meaning does not
    change with the layout: gradients equal those of the contiguous model."""
    x, t = batch(n=6, shape=(2, 8, 8))
    conv = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 5),
    )  # fmt: skip
    results, layouts = [], []
    for channels_last in (False, True):
        model = copy.deepcopy(conv)
        inputs = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        engine = dfatorch.attach(model, "dfa", seed=1)
        results.append(step(model, inputs, t))
        layouts.append(engine.feedback.sizes)
    assert layouts[0] == layouts[1] == [4 * 4 * 4, 6 * 4 * 4]
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name])


def test_project_like_returns_views_in_the_points_layout():
    fb = dfatorch.FeedbackMatrix(3, [2 * 4 * 5, 7], binary=[False, True], seed=0)
    points = [torch.randn(6, 2, 4, 5).contiguous(memory_format=torch.channels_last),
              torch.randn(6, 7)]  # fmt: skip
    e = torch.randn(6, 3)
    plain = fb.project(e)
    shaped = fb.project(e, points)
    assert shaped[0].stride()[1:] == points[0].stride()[1:]  # per sample, channels last
    assert shaped[0].untyped_storage().data_ptr() == shaped[1].untyped_storage().data_ptr()
    torch.testing.assert_close(shaped[0], plain[0].view(6, 2, 4, 5))
    torch.testing.assert_close(shaped[1], plain[1])


def test_per_layer_rules_mix_float_binary_and_bp():
    """rules= overrides the preset layer by layer: a binary layer, a float layer and a BP layer in
    one model, each getting exactly its formula."""
    x, t = batch()
    model = make_mlp()
    engine = dfatorch.attach(model, "dfa", rules={"0": "bdfa", "4": "bp"}, seed=2)
    assert {k: v.value for k, v in engine.rules.items()} == {
        "0": "bdfa",
        "2": "dfa",
        "4": "bp",
        "6": "bp",
    }
    got = step(model, x, t)
    assert engine.feedback.binary == [True, False] and engine.feedback.sizes == [16, 14]
    b1, b2 = engine.feedback.blocks(torch.float64)
    assert set(b1.abs().unique().tolist()) == {engine.feedback.scales[0].item()}
    lin = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        h1 = torch.tanh(lin[0](x))
        h2 = torch.tanh(lin[1](h1))
        h3 = torch.tanh(lin[2](h2))
        e = output_error(lin[3](h3), t)
        d3 = (e @ lin[3].weight) * (1 - h3**2)  # layer "4" is BP: W^T delta from the output
        d2 = (e @ b2) * (1 - h2**2)  # layer "2": its float projection, not d3 back-propagated
        d1 = (e @ b1) * (1 - h1**2)
    torch.testing.assert_close(got["4.weight"], d3.T @ h2)
    torch.testing.assert_close(got["2.weight"], d2.T @ h1)
    torch.testing.assert_close(got["0.weight"], d1.T @ x)
