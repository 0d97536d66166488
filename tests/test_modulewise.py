"""Module-wise DFA and the structured feedback (sparse, conv): operators against explicit dense
matrices, gradients against formulas written out here, state round trips, refusals, resnet20."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_engine import MatmulCounter, batch, output_error, step
from torch import nn

import dfatorch
from dfatorch.config import TrainConfig, parse_options
from dfatorch.feedback import ConvPattern, FeedbackMatrix, SparsePattern
from dfatorch.models import build_model, count_parameters
from dfatorch.modulewise import (
    MAX_OPERATOR_ENTRIES,
    ConvOperator,
    SparseOperator,
    make_operator,
)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# -- toy networks of two modules ------------------------------------------------------------------


class LinearBlock(nn.Module):
    """A residual module: tanh(b(tanh(a(x))) + x)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(x))) + x)


class ToyMLP(nn.Module):
    """m1 = (Linear 6->8, tanh, Linear 8->8, tanh), m2 = a residual block, out = Linear 8->5."""

    def __init__(self) -> None:
        super().__init__()
        self.m1 = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.m2 = LinearBlock(8)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.m2(self.m1(x)))


def toy_mlp(seed: int = 0) -> ToyMLP:
    torch.manual_seed(seed)
    return ToyMLP()


def operator_matrix(op) -> torch.Tensor:
    """The dense (source, target) matrix of a dense or sparse operator, from its buffers."""
    scale = op.scales.item()
    if isinstance(op, SparseOperator):
        dense = torch.zeros(op.target_size, op.source_size)
        rows = torch.arange(op.target_size).repeat_interleave(op.per_unit)
        dense[rows, op.columns.long()] = op.values.double()
        return dense.T * scale
    return op.pattern.double() * scale


def toy_mlp_manual(model: ToyMLP, x, t, blocks, inner: str, ops=None):
    """Explicit module-wise gradients of ToyMLP: g_M = e @ B_M at each module's output; inside,
    DFA from g_M through the operator's matrix, or BP of g_M (the skip of m2 reaches m1's output,
    which is cut: it carries nothing back)."""
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        a1 = x @ w["m1.0.weight"].T + w["m1.0.bias"]
        h1 = torch.tanh(a1)
        h2 = torch.tanh(h1 @ w["m1.2.weight"].T + w["m1.2.bias"])
        h3 = torch.tanh(h2 @ w["m2.a.weight"].T + w["m2.a.bias"])
        h4 = torch.tanh(h3 @ w["m2.b.weight"].T + w["m2.b.bias"] + h2)
        y = h4 @ w["out.weight"].T + w["out.bias"]
        e = output_error(y, t)
        g1, g2 = e @ blocks[0], e @ blocks[1]
        d2 = g1 * (1 - h2**2)
        d4 = g2 * (1 - h4**2)
        if inner == "dfa":
            d1 = (g1 @ ops[0]) * (1 - h1**2)
            d3 = (g2 @ ops[1]) * (1 - h3**2)
        else:
            d1 = (d2 @ w["m1.2.weight"]) * (1 - h1**2)
            d3 = (d4 @ w["m2.b.weight"]) * (1 - h3**2)
        want = {}
        for name, delta, inp in (("m1.0", d1, x), ("m1.2", d2, h1), ("m2.a", d3, h2),
                                 ("m2.b", d4, h3), ("out", e, h4)):  # fmt: skip
            want[f"{name}.weight"] = delta.T @ inp
            want[f"{name}.bias"] = delta.sum(0)
    return want


@pytest.mark.parametrize(
    ("method", "inner", "init", "storage"),
    [
        ("dfa", "dfa", "uniform", "dense"),
        ("bdfa", "dfa", "uniform", "packed"),
        ("dfa", "dfa", SparsePattern(density=0.25), "sparse"),
        ("bdfa", "dfa", SparsePattern(density=0.5), "seeded"),
        ("dfa", "bp", "uniform", "dense"),
        ("bdfa", "bp", SparsePattern(density=0.2), "sparse"),
    ],
    ids=["dfa-dense", "bdfa-dense", "dfa-sparse", "bdfa-sparse", "bp-dense", "bp-sparse"],
)
def test_toy_mlp_gradients_match_formula(method, inner, init, storage):
    x, t = batch(n=7, shape=(6,))
    model = toy_mlp()
    engine = dfatorch.attach(
        model, method, scope="module", modules=["m1", "m2"], inner=inner, init=init,
        storage=storage, seed=3,
    )  # fmt: skip
    got = step(model, x, t)
    assert engine.feedback_layers == ["m1", "m2"]
    blocks = engine.feedback.blocks(torch.float64)
    ops = [operator_matrix(op) for op in engine.operators]
    assert engine.inner_points == ([("m1", "m1.0"), ("m2", "m2.a")] if inner == "dfa" else [])
    if method == "bdfa" and inner == "dfa":  # binary operators: two values, -s and +s
        for op, matrix in zip(engine.operators, ops):
            assert set(matrix[matrix != 0].abs().unique().tolist()) == {op.scales.item()}
    want = toy_mlp_manual(model, x, t, blocks, inner, ops)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("inner", ["dfa", "bp"])
def test_module_wise_dkp_learns_b_m_by_e_transpose_h_m(inner):
    """Module-wise Direct Kolen-Pollack: the weights get the module-wise gradients of the current
    (learned) B_M, and each B_M the gradient e^T h_M of a direct connection from the module's
    output h_M to y; SGD with weight decay then moves B_M by -lr (e^T h_M + wd B_M)."""
    x, t = batch(n=7, shape=(6,))
    model = toy_mlp(seed=4)
    engine = dfatorch.attach(
        model, "dkp", scope="module", modules=["m1", "m2"], inner=inner, seed=3, example_input=x
    )
    assert engine.feedback.learned == [True, True]
    assert [p.shape for p in engine.parameters()] == [(5, 8), (5, 8)]
    # the float32 pattern it started from (5 x 16) and the two float64 learned blocks
    assert engine.feedback.storage_bytes()["pattern"] == 4 * 5 * 16 + 2 * 8 * 5 * 8
    lr, wd = 0.5, 0.01
    opt = torch.optim.SGD([*model.parameters(), *engine.parameters()], lr=lr, weight_decay=wd)
    ops = [operator_matrix(op) for op in engine.operators]
    for _ in range(3):
        blocks = [p.detach().clone() for p in engine.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        want = toy_mlp_manual(model, x, t, blocks, inner, ops)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")
        with torch.no_grad():
            h2 = model.m1(x)
            h4 = model.m2(h2)
            e = output_error(model.out(h4), t)
        updates = [e.T @ h2, e.T @ h4]
        for p, u in zip(engine.parameters(), updates):
            torch.testing.assert_close(p.grad, u)
        opt.step()
        for p, b0, u in zip(engine.parameters(), blocks, updates):
            torch.testing.assert_close(p.detach(), b0 - lr * (u + wd * b0))


def test_module_wise_dkp_refuses_a_module_output_changed_in_place():
    """e^T h_M reads the module's output at the end of the pass: an in-place op after the cut
    (outside every module, where parameter-free modules may sit) would change it silently."""

    def model(inplace: bool) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.ReLU(inplace=inplace),
            nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 5),
        )  # fmt: skip

    x, t = batch(n=4, shape=(6,))
    with pytest.raises(RuntimeError, match=r"'0' was changed in place.*ReLU\(inplace=True\)"):
        dfatorch.attach(model(True), "dkp", scope="module", modules=["0", "2"], example_input=x)
    net = model(False)
    dfatorch.attach(net, "dkp", scope="module", modules=["0", "2"], example_input=x)
    F.cross_entropy(net(x), t).backward()  # out of place: trains


def test_inner_bp_equals_autograd_of_the_projected_error():
    """inner='bp': each module's parameters get autograd's gradient of <h_M, e @ B_M>, with the
    module's input held fixed (the residual block's skip included)."""
    x, t = batch(n=5, shape=(6,))
    model = toy_mlp(seed=2)
    engine = dfatorch.attach(model, "dfa", scope="module", modules=["m1", "m2"], inner="bp")
    got = step(model, x, t)
    ref = toy_mlp(seed=2)
    with torch.no_grad():
        e = output_error(ref(x), t)
    b1, b2 = engine.feedback.blocks(torch.float64)
    h2 = ref.m1(x)
    want1 = torch.autograd.grad(h2, list(ref.m1.parameters()), grad_outputs=e @ b1)
    want2 = torch.autograd.grad(ref.m2(h2.detach()), list(ref.m2.parameters()), e @ b2)
    names = [n for n, _ in ref.m1.named_parameters()]
    for n, w in zip(names, want1):
        torch.testing.assert_close(got[f"m1.{n}"], w)
    for (n, _), w in zip(ref.m2.named_parameters(), want2):
        torch.testing.assert_close(got[f"m2.{n}"], w)


def test_one_projection_for_all_modules():
    """Every module's error comes from ONE matmul e @ [B_m1 | B_m2]; inner BP adds the modules'
    own back-propagation (one W^T delta per module but its first layer), nothing across them."""
    x, t = batch(n=7, shape=(6,))
    model = toy_mlp()
    dfatorch.attach(model, "dfa", scope="module", modules=["m1", "m2"], inner="bp")
    loss = F.cross_entropy(model(x), t)
    with MatmulCounter() as counter:
        loss.backward()
    assert ((7, 5), (5, 8 + 8)) in counter.shapes
    assert len(counter.shapes) == 5 + 1 + 2  # 5 weight gradients, 1 projection, 2 W^T delta


def test_copy_trains_alike_and_remove_restores_bp():
    from dfatorch.engine import attached_engine

    x, t = batch(n=5, shape=(6,))
    model = toy_mlp()
    engine = dfatorch.attach(model, "bdfa", scope="module", modules=["m1", "m2"], seed=2)
    twin = copy.deepcopy(model)
    twin_engine = attached_engine(twin)
    assert twin_engine is not engine and twin_engine.module_infos[1].exit is twin.m2
    want = step(model, x, t)
    got = step(twin, x, t)
    assert all(torch.equal(got[n], want[n]) for n in want)
    engine.remove()
    plain = toy_mlp()
    plain.load_state_dict(model.state_dict())
    bp, after = step(plain, x, t), step(model, x, t)
    assert all(torch.equal(after[n], bp[n]) for n in bp)
    assert not torch.equal(step(twin, x, t)["m1.0.weight"], bp["m1.0.weight"])  # copy keeps DFA


@pytest.mark.parametrize(
    ("inner", "init", "storage"),
    [("bp", SparsePattern(density=0.3), "sparse"), ("dfa", ConvPattern(dilation=2), "dense")],
)
def test_channels_last_module_outputs_get_the_same_gradients(inner, init, storage):
    x, t = batch(n=4, shape=(3, 8, 8), classes=10)
    torch.manual_seed(0)
    base = build_model("resnet20", (3, 8, 8), 10, width=0.25)
    results = []
    for channels_last in (False, True):
        model, inputs = copy.deepcopy(base), x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        dfatorch.attach(model, "dfa", scope="module", inner=inner, init=init, storage=storage)
        results.append(step(model, inputs, t))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name])


# -- a conv toy network: the conv feedback inside modules -------------------------------------


class ConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(F.relu(self.a(x))) + x)


class ToyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m1 = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        )
        self.m2 = ConvBlock(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.adaptive_avg_pool2d(self.m2(self.m1(x)), 1).flatten(1))


@pytest.mark.parametrize(("method", "options"), [
    ("dfa", {"kernel": 3, "dilation": 2, "groups": 2}),
    ("bdfa", {"kernel": 1, "dilation": 1, "groups": 4}),
    ("dfa", {"kernel": 5, "dilation": 1, "groups": 1}),
])  # fmt: skip
def test_toy_cnn_conv_feedback_gradients_match_formula(method, options):
    x, t = batch(n=4, shape=(2, 6, 6), classes=3)
    torch.manual_seed(1)
    model = ToyCNN()
    engine = dfatorch.attach(
        model, method, scope="module", modules=["m1", "m2"], init=ConvPattern(**options), seed=4
    )
    got = step(model, x, t)
    k, d, g = options["kernel"], options["dilation"], options["groups"]
    ops = list(engine.operators)
    assert all(isinstance(op, ConvOperator) for op in ops)
    assert [tuple(op.kernel.shape) for op in ops] == [(4, 4 // g, k, k)] * 2
    w = {n: p.detach() for n, p in model.named_parameters()}

    def conv(inp, name):
        return F.conv2d(inp, w[f"{name}.weight"], w[f"{name}.bias"], padding=1)

    def feedback(signal, op):  # the random convolution, written out with F.conv2d
        return F.conv2d(signal, op.kernel.double(), padding=d * (k - 1) // 2, dilation=d,
                        groups=g) * op.scales.item()  # fmt: skip

    def weight_grad(inp, name, delta):
        return torch.nn.grad.conv2d_weight(inp, w[f"{name}.weight"].shape, delta, padding=1)

    with torch.no_grad():
        a1 = conv(x, "m1.0")
        h1 = F.relu(a1)
        a2 = conv(h1, "m1.2")
        h2 = F.relu(a2)
        a3 = conv(h2, "m2.a")
        h3 = F.relu(a3)
        a4 = conv(h3, "m2.b") + h2
        h4 = F.relu(a4)
        pooled = h4.mean((2, 3))
        e = output_error(pooled @ w["out.weight"].T + w["out.bias"], t)
        b1, b2 = engine.feedback.blocks(torch.float64)
        g1, g2 = (e @ b1).view_as(h2), (e @ b2).view_as(h4)
        d2 = g1 * (a2 > 0)
        d1 = feedback(g1, ops[0]) * (a1 > 0)
        d4 = g2 * (a4 > 0)
        d3 = feedback(g2, ops[1]) * (a3 > 0)
        want = {"out.weight": e.T @ pooled, "out.bias": e.sum(0)}
        for name, delta, inp in (("m1.0", d1, x), ("m1.2", d2, h1), ("m2.a", d3, h2),
                                 ("m2.b", d4, h3)):  # fmt: skip
            want[f"{name}.weight"] = weight_grad(inp, name, delta)
            want[f"{name}.bias"] = delta.sum((0, 2, 3))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")
    if method == "bdfa":
        for op in ops:
            assert set(op.kernel.abs().unique().tolist()) == {1.0}


# -- the operators against dense matrices ----------------------------------------------------


def conv_operator(source, target, **options) -> ConvOperator:
    op = make_operator(ConvPattern(**options), source, target, seed=7, binary=False, name="t")
    assert isinstance(op, ConvOperator)
    return op


def test_dilated_kernel_equals_zero_filled_dense_kernel():
    """A k x k kernel with dilation d equals the (d(k-1)+1)^2 kernel with zeros between taps."""
    for k, d, g in [(3, 2, 1), (3, 3, 2), (5, 2, 4)]:
        dilated = conv_operator((4, 11, 11), (8, 11, 11), kernel=k, dilation=d, groups=g)
        size = d * (k - 1) + 1
        full = conv_operator((4, 11, 11), (8, 11, 11), kernel=size, dilation=1, groups=g)
        zero_filled = torch.zeros_like(full.kernel)
        zero_filled[:, :, ::d, ::d] = dilated.kernel
        full.kernel.copy_(zero_filled)
        full.scales.copy_(dilated.scales)
        signal = torch.randn(3, 4, 11, 11)
        torch.testing.assert_close(dilated(signal), full(signal))
        assert dilated.nbytes() == 4 * k * k * 4 * 8 // g  # independent of H and W
        assert dilated.macs() == 8 * 11 * 11 * k * k * 4 // g


def explicit_conv_matrix(op: ConvOperator) -> torch.Tensor:
    """The (source, target) matrix of a same-size conv operator, from its kernel by loops."""
    c_in, h, w = op.source_map
    c_out = op.target_map[0]
    k, d, g = op.kernel_size, op.dilation, op.groups
    half = d * (k - 1) // 2
    per_in, per_out = c_in // g, c_out // g
    matrix = torch.zeros(c_in, h, w, c_out, h, w)
    for co in range(c_out):
        group = co // per_out
        for ci in range(group * per_in, (group + 1) * per_in):
            for ky in range(k):
                for kx in range(k):
                    weight = op.kernel[co, ci - group * per_in, ky, kx].item()
                    for yo in range(h):
                        for xo in range(w):
                            yi, xi = yo + ky * d - half, xo + kx * d - half
                            if 0 <= yi < h and 0 <= xi < w:
                                matrix[ci, yi, xi, co, yo, xo] += weight
    return matrix.reshape(c_in * h * w, c_out * h * w) * op.scales.item()


def test_grouped_conv_feedback_equals_its_block_diagonal_matrix():
    op = conv_operator((4, 5, 5), (6, 5, 5), kernel=3, dilation=2, groups=2)
    dense = op.dense_matrix()
    torch.testing.assert_close(dense, explicit_conv_matrix(op))
    blocks = dense.view(2, 2 * 25, 2, 3 * 25)  # (group in, units, group out, units)
    assert torch.count_nonzero(blocks[0, :, 1]) == 0 and torch.count_nonzero(blocks[1, :, 0]) == 0
    assert torch.count_nonzero(blocks[0, :, 0]) > 0 and torch.count_nonzero(blocks[1, :, 1]) > 0


def test_conv_feedback_resizes_flat_and_smaller_maps():
    """A larger source map is average-pooled to the target's size, a smaller one repeated
    (nearest), a flat source broadcast over the target's positions; a flat target is a 1x1
    map whose operator is a (grouped) dense matrix of the source's channel means."""
    signal = torch.randn(2, 4, 8, 8)
    down = conv_operator((4, 8, 8), (6, 4, 4), kernel=3)
    want = F.conv2d(F.avg_pool2d(signal, 2), down.kernel.double(), padding=1) * down.scales
    torch.testing.assert_close(down(signal), want)
    small = torch.randn(2, 4, 2, 2)
    up = conv_operator((4, 2, 2), (6, 4, 4), kernel=3)
    repeated = small.repeat_interleave(2, 2).repeat_interleave(2, 3)
    want = F.conv2d(repeated, up.kernel.double(), padding=1) * up.scales
    torch.testing.assert_close(up(small), want)
    flat = conv_operator((4, 8, 8), (6,), kernel=3, dilation=2)
    assert flat.kernel.shape == (6, 4, 1, 1)
    torch.testing.assert_close(
        flat(signal), signal.mean((2, 3)) @ flat.kernel.double()[:, :, 0, 0].T * flat.scales
    )
    spread = conv_operator((4,), (6, 3, 3), kernel=1)
    vector = torch.randn(2, 4)
    torch.testing.assert_close(
        spread(vector),
        (vector @ spread.kernel.double()[:, :, 0, 0].T * spread.scales)[..., None, None].expand(
            2, 6, 3, 3
        ),
    )


def test_sparse_b_equals_its_dense_copy():
    structure = SparsePattern(density=0.3)
    sizes = [4 * 3 * 3, 17]
    kw = dict(binary=[False, True], init=structure, seed=5)
    sparse = FeedbackMatrix(10, sizes, storage="sparse", **kw)
    dense = FeedbackMatrix(10, sizes, storage="dense", **kw)
    assert torch.equal(sparse.full_pattern(), dense.full_pattern())
    error = torch.randn(6, 10)
    torch.testing.assert_close(sparse.signal(error), dense.signal(error))
    points = [torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last),
              torch.randn(6, 17)]  # fmt: skip
    for a, b in zip(sparse.project(error, points), dense.project(error, points)):
        torch.testing.assert_close(a, b)
        assert a.stride() == b.stride()
    # three of ten classes per unit, exactly; bytes and multiply-adds of the non-zeros only
    pattern = dense.full_pattern()
    assert torch.equal((pattern != 0).sum(0), torch.full((sum(sizes),), 3))
    nnz, units = 3 * sum(sizes), sum(sizes)
    assert sparse.storage_bytes()["pattern"] == 4 * (units + 1) + 8 * nnz
    assert sparse.projection_macs() == nnz and dense.projection_macs() == 10 * units
    # the binary point: signs on the non-zeros; its scale gives the float columns' norm
    signs = pattern[:, 36:]
    assert set(signs[signs != 0].unique().tolist()) == {-1.0, 1.0}
    float_norm = 10 / (3 * 17)  # E|column|^2 of uniform, which the float sparse columns keep
    assert sparse.scales[1].item() ** 2 * 3 == pytest.approx(float_norm)


@pytest.mark.parametrize("density", [0.2, 0.8])  # rows drawn and redrawn, or a permutation
def test_sparse_operator_equals_its_dense_copy(density):
    op = make_operator(SparsePattern(density=density), (3, 4, 4), (5, 2, 2), seed=1, binary=False)
    assert isinstance(op, SparseOperator) and op.per_unit == round(density * 48)
    matrix = operator_matrix(op)
    assert torch.equal((matrix != 0).sum(0), torch.full((20,), op.per_unit))
    torch.testing.assert_close(op.dense_matrix(), matrix)
    signal = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(op(signal), (signal.flatten(1) @ matrix).view(4, 5, 2, 2))
    assert op.nbytes() == 8 * op.per_unit * 20 and op.macs() == op.per_unit * 20


def test_one_connection_per_unit_is_crafton_extreme():
    pattern = SparsePattern(density=0.1).sample(
        10, 500, generator=torch.Generator().manual_seed(0), binary=False
    )
    assert torch.equal((pattern != 0).sum(0), torch.ones(500, dtype=torch.long))
    assert len(set(pattern.abs().argmax(0).tolist())) == 10  # every class is used


# -- state and resume --------------------------------------------------------------------------


CASES = {
    "sparse-all": dict(method="dfa", scope="all", init=SparsePattern(density=0.2),
                       storage="sparse"),
    "sparse-seeded": dict(method="bdfa", scope="all", init=SparsePattern(density=0.2),
                          storage="seeded"),
    "module-dfa-dense": dict(method="dfa", scope="module", inner="dfa"),
    "module-dfa-sparse": dict(method="bdfa", scope="module", inner="dfa",
                              init=SparsePattern(density=0.3), storage="sparse"),
    "module-dfa-conv": dict(method="dfa", scope="module", init=ConvPattern(dilation=2, groups=2)),
    "module-bdfa-conv": dict(method="bdfa", scope="module", init=ConvPattern(kernel=1),
                             storage="packed"),
    "module-bp-sparse": dict(method="dfa", scope="module", inner="bp",
                             init=SparsePattern(density=0.5), storage="sparse"),
    "module-dkp-conv": dict(method="dkp", scope="module", init=ConvPattern(dilation=2)),
}  # fmt: skip


def make_case(case: str, seed: int = 0):
    torch.manual_seed(seed)
    options = dict(CASES[case])
    model = ToyCNN() if options["scope"] == "module" else nn.Sequential(  # no skip for DFA
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    method = options.pop("method")
    if options["scope"] == "module":
        options["modules"] = ["m1", "m2"]
    feedback_seed = 9 + seed
    if method == "dkp":  # its learned B_M exist from attach() on, and train with the weights;
        # a built engine refuses a state of another seed, so only the model's seed differs
        options["example_input"] = torch.zeros(1, 2, 6, 6)
        feedback_seed = 9
    engine = dfatorch.attach(model, method, seed=feedback_seed, **options)
    params = [*model.parameters(), *engine.parameters()]
    return model, engine, torch.optim.SGD(params, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_and_exact_resume(case):
    x, t = batch(n=8, shape=(2, 6, 6), classes=3, seed=2)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward()
            opt.step()

    model, engine, opt = make_case(case)
    train(model, opt, 2)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "engine": engine.state_dict()}
    )
    train(model, opt, 3)
    other, resumed, other_opt = make_case(case, seed=5)  # loaded before its first pass (dkp:
    # after the probe pass of attach(), which built its feedback)
    other.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["engine"])
    assert len(resumed.operators) == len(engine.operators)
    for a, b in zip(resumed.operators, engine.operators):
        assert a.layout() == b.layout()
        assert all(torch.equal(p, q) for p, q in zip(a.buffers(), b.buffers()))
    train(other, other_opt, 3)
    # after the same steps: a learned B_M (dkp) trained on alike, a fixed one is unchanged
    assert torch.equal(resumed.feedback.matrix(), engine.feedback.matrix())
    for a, b in zip(resumed.parameters(), engine.parameters(), strict=True):
        assert torch.equal(a, b)  # learned blocks in their own (float64) precision
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_refuses_other_modules_or_operators():
    x, _ = batch(n=2, shape=(2, 6, 6), classes=3)
    torch.manual_seed(0)
    engine = dfatorch.attach(ToyCNN(), "dfa", scope="module", modules=["m1", "m2"], init="conv",
                             example_input=x)  # fmt: skip
    state = engine.state_dict()
    other = dfatorch.attach(ToyCNN(), "dfa", scope="module", modules=["m1", "m2"], inner="bp")
    with pytest.raises(ValueError, match="saved modules"):
        other.load_state_dict(state)
    built = dfatorch.attach(ToyCNN(), "dfa", scope="module", modules=["m1", "m2"],
                            init=ConvPattern(dilation=2), example_input=x)  # fmt: skip
    with pytest.raises(ValueError, match="init_options"):
        built.load_state_dict(state)
    with pytest.raises(ValueError, match="saved modules"):  # and a layer-wise engine
        dfatorch.attach(ToyCNN(), "dfa").load_state_dict(state)


# -- refusals ----------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(("make", "match"), [
    (lambda: SparsePattern(density=0), r"density must be in \(0, 1\], got 0"),
    (lambda: SparsePattern(density=1.5), r"density must be in \(0, 1\], got 1.5"),
    (lambda: ConvPattern(dilation=0), "dilation must be >= 1, got 0"),
    (lambda: ConvPattern(kernel=4), "kernel must be odd"),
    (lambda: ConvPattern(groups=0), "groups must be >= 1"),
    (lambda: conv_operator((4, 3, 3), (6, 3, 3), groups=4),
     r"groups=4 does not divide the channels of the inner feedback t \(4 -> 6\)"),
    (lambda: conv_operator((4, 3, 3, 3), (6, 3, 3), groups=1), "2-D maps"),
    (lambda: conv_operator((4, 8, 2), (6, 4, 4)), "larger in one direction"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m9*"]),
     r"modules: 'm9\*' matches no module of ToyMLP \(its top-level modules: m1, m2, out\)"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m2"]),
     r"hidden layers \['m1.0', 'm1.2'\] are in no module"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m2", "out"]),
     "holds the output layer 'out'"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m1.0", "m2"]),
     "layer 'm1.0' is in two modules"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1.2..m1.0", "m2"]),
     "'m1.0' comes before 'm1.2'"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1.0..m2.a", "m2"]),
     "are not siblings"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m2.b"]),
     r"hidden layers \['m2.a'\] are in no module"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module"), "names no default"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", modules=["m1"]), "apply to scope='module'"),
    (lambda: dfatorch.attach(ToyMLP(), "fa", scope="module", modules=["m1", "m2"]),
     "takes method 'dfa', 'bdfa' or 'dkp'"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", init="conv"), "needs scope='module' with inner"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m2"], inner="bp",
                             init="conv"), "needs scope='module' with inner='dfa'"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m2"],
                             rules={"m1.0": "bp"}), "do not combine"),
    (lambda: dfatorch.attach(ToyMLP(), "dfa", scope="module", modules=["m1", "m2"],
                             init="norm_matched"), "norm_matched"),
    (lambda: dfatorch.attach(ToyCNN(), "dfa", scope="module", modules=["m1", "m2"],
                             init=ConvPattern(groups=3), example_input=torch.zeros(2, 2, 6, 6)),
     "groups=3 does not divide the channels"),
    (lambda: make_operator(dfatorch.feedback.make_pattern("uniform"), (4096,), (4097,), seed=0,
                           binary=False, name="t"), "use init='conv'"),
    (lambda: TrainConfig(init="sparse", init_options="density=2"), "density must be in"),
    (lambda: TrainConfig(init="conv", init_options="dilation"), "want KEY=VALUE"),
    (lambda: TrainConfig(scope="fc", modules="stem"), "modules applies to scope=module"),
])  # fmt: skip
def test_bad_parameters_give_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as excinfo:
        make()
    one_line(excinfo)


def test_operator_size_limit_is_the_documented_one():
    structure = dfatorch.feedback.make_pattern("uniform")
    make_operator(structure, (4096,), (4096,), seed=0, binary=False)  # 2^24 entries: accepted
    assert MAX_OPERATOR_ENTRIES == 4096 * 4096
    with pytest.raises(ValueError, match="16,781,312 entries"):
        make_operator(structure, (4096,), (4097,), seed=0, binary=False)


class SkipBlock(LinearBlock):
    """The first layer's output also skips the second: tanh(b(h) + h), h = tanh(a(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return torch.tanh(self.b(h) + h)


class BranchBlock(LinearBlock):
    """Two parallel layers: b does not take a's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x)) + torch.tanh(self.b(x))


class Holder(nn.Module):
    def __init__(self, block: type[LinearBlock]) -> None:
        super().__init__()
        self.m = block(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.m(x))


@pytest.mark.parametrize(("block", "match"), [
    (SkipBlock, "bypasses the next layer"),
    (BranchBlock, "is not computed from the output of 'm.a'"),
])  # fmt: skip
def test_inner_dfa_needs_chains_inside_modules(block, match):
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=match) as excinfo:
        dfatorch.attach(Holder(block), "dfa", scope="module", modules=["m"], example_input=x)
    one_line(excinfo)
    dfatorch.attach(Holder(block), "dfa", scope="module", modules=["m"], inner="bp",
                    example_input=x)  # fmt: skip


def test_parametrised_module_outside_every_module_is_refused():
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    )
    with pytest.raises(ValueError, match=r"module '2' \(BatchNorm1d\) has parameters") as info:
        dfatorch.attach(model, "dfa", scope="module", modules=["0..1", "3..4"])
    one_line(info)
    dfatorch.attach(model, "dfa", scope="module", modules=["0..2", "3..4"])


# -- resnet20 and the zoo's defaults --------------------------------------------------------------


def test_resnet20_architecture_and_default_modules():
    model = build_model("resnet20", (3, 32, 32), 10)
    assert count_parameters(model) == 269_722  # He et al.: 0.27 M
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convs and the classifier: ResNet-20
    assert [c.out_channels for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        block = model.stage2[0]
        shortcut = block.shortcut(x[:, :1].expand(2, 16, 32, 32))  # option A: no parameter
        assert shortcut.shape == (2, 32, 16, 16) and not list(block.shortcut.parameters())
        assert torch.equal(shortcut[:, :8], torch.zeros(2, 8, 16, 16))
        assert torch.equal(shortcut[:, 8:24], x[:, :1, ::2, ::2].expand(2, 16, 16, 16))
    engine = dfatorch.attach(model, "bdfa", scope="module", init="conv", example_input=x)
    assert engine.feedback_layers == ["stem"] + [f"stage{s}.{b}" for s in (1, 2, 3)
                                                 for b in range(3)]  # fmt: skip
    assert engine.feedback.sizes == [16 * 32 * 32] * 4 + [32 * 16 * 16] * 3 + [64 * 8 * 8] * 3
    assert [layer for _, layer in engine.inner_points] == [
        f"stage{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)
    ]
    with pytest.raises(ValueError, match="bypasses its cut"):  # plain DFA cannot train it
        dfatorch.attach(build_model("resnet20", (3, 32, 32), 10), "dfa", example_input=x)
    with pytest.raises(ValueError, match="no hidden fully connected layer"):
        build_model("resnet20", (3, 32, 32), 10, dropout=0.5)


def test_resnet20_module_wise_bp_inside_equals_autograd():
    """inner='bp' on resnet20: every block's parameters get autograd's gradient of its output
    against e @ B_M, the block's input held fixed (skips inside blocks are fine)."""
    x, t = batch(n=3, shape=(3, 16, 16), classes=10)
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 16, 16), 10, width=0.5)
    ref = copy.deepcopy(model)
    engine = dfatorch.attach(model, "dfa", scope="module", inner="bp", seed=1)
    got = step(model, x, t)
    blocks = dict(zip(engine.feedback.names, engine.feedback.blocks(torch.float64)))
    with torch.no_grad():
        e = output_error(ref(x), t)
    ref.train()  # the same batch statistics as the engine's pass
    inp = x
    for name in engine.feedback_layers:
        module = ref.get_submodule(name)
        out = module(inp)
        params = list(module.named_parameters())
        want = torch.autograd.grad(out, [p for _, p in params], (e @ blocks[name]).view_as(out))
        for (n, _), w in zip(params, want):
            torch.testing.assert_close(got[f"{name}.{n}"], w, msg=lambda m, n=n: f"{n}: {m}")
        inp = out.detach()


def test_zoo_cnn_and_mlp_default_modules():
    small = build_model("small_cnn", (3, 32, 32), 10)
    assert small.feedback_modules == ("0..8", "10..13")
    bn = build_model("small_cnn", (3, 32, 32), 10, batch_norm=True, dropout=0.2)
    engine = dfatorch.attach(bn, "dfa", scope="module", inner="bp")
    assert engine.modules_of_layers == {"0": "0..11", "4": "0..11", "8": "0..11",
                                        "13": "13..20", "17": "13..20"}  # fmt: skip
    mlp = build_model("mlp_3x800", (1, 8, 8), 10, width=0.05)
    engine = dfatorch.attach(mlp, "dfa", scope="module")
    assert engine.feedback_layers == ["1..6"] and len(engine.inner_points) == 2


def test_feedback_cost_is_the_engines_own_accounting():
    x = torch.zeros(2, 3, 32, 32)
    small = build_model("small_cnn", (3, 32, 32), 10)
    dense = dfatorch.attach(small, "dfa", scope="all", example_input=x).feedback_cost()
    units = 32 * 16 * 16 + 64 * 8 * 8 + 64 * 4 * 4 + 256 + 256
    assert dense["units"] == units and dense["pattern_bytes"] == 4 * 10 * units
    assert dense["projection_macs"] == 10 * units and dense["inner_macs"] == 0
    conv = dfatorch.attach(
        build_model("small_cnn", (3, 32, 32), 10), "dfa", scope="module",
        init=ConvPattern(dilation=2, groups=2), example_input=x,
    ).feedback_cost()  # fmt: skip
    assert conv["units"] == 64 * 4 * 4 + 256
    # conv1's and conv2's inner operators from the 64x4x4 module output, fc1's a 1x1 conv
    assert conv["inner_bytes"] == 4 * (9 * 64 * 32 // 2 + 9 * 64 * 64 // 2 + 256 * 256 // 2)
    assert conv["inner_macs"] == (32 * 16 * 16 * 9 * 32 + 64 * 8 * 8 * 9 * 32 + 256 * 128)
    assert conv["total_bytes"] == conv["pattern_bytes"] + conv["scale_bytes"] + conv["inner_bytes"]


# -- configuration and command line ------------------------------------------------------------


def test_config_fields_and_options():
    assert parse_options("kernel=3, dilation=2") == {"kernel": "3", "dilation": "2"}
    assert parse_options(None) == {}
    config = TrainConfig(model="resnet20", method="dfa", scope="module", init="conv",
                         init_options="dilation=2,groups=4", modules="stem,stage*.*")  # fmt: skip
    assert config.module_list() == ["stem", "stage*.*"]
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.slow
def test_cli_trains_resnet20_module_wise(tmp_path):
    from dfatorch.cli import main

    torch.set_default_dtype(torch.float32)  # the trainer's models and data are float32
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--model", "resnet20", "--method", "bdfa",
            "--scope", "module", "--init", "conv", "--init-options", "dilation=2",
            "--epochs", "1", "--fraction", "0.3", "--out", str(out), "--no-progress"]  # fmt: skip
    code = main(argv)
    assert code == 0
    assert (out / "checkpoint.pt").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("operators.") for k in saved["engine"])
