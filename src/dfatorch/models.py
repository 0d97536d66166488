"""The model zoo, with parameter and multiply-add counts.

Every model but ``resnet20`` is a plain ``nn.Sequential`` of standard layers, so
:func:`dfatorch.attach` sees its layers in execution order. Build one by name with
:func:`build_model`; ``activation``, ``batch_norm``, ``dropout`` and ``width`` (a multiplier on
every hidden width) are options of all (``resnet20``: always batch norm, no dropout).

Every model names its default modules for module-wise DFA (``attach(..., scope="module")``) in
its ``feedback_modules`` attribute: the conv stack (up to its last pooling) and the hidden fully
connected stack of the plain CNNs (two modules, ``"FIRST..LAST"`` ranges of the
``nn.Sequential``), the hidden stack of the MLPs, the stem and each residual block of
``resnet20``.

======================  ==========================================================================
name                    architecture (for 3x32x32 inputs)
======================  ==========================================================================
``nokland_cnn``         Nøkland (2016): conv96-conv128-conv256 5x5, max-pool 3/2, FC2048-FC2048
``small_cnn``           conv32-conv64-conv64 3x3 with 2x2 max-pool (as in Launay et al. 2019),
                        FC256-FC256, tanh
``vgg_cnn``             VGG-style: 2x conv32, pool, 2x conv64, pool, 2x conv128, pool, FC512-FC512
``track_cnn``           conv32-pool-conv64-pool-conv96 3x3 (stride 4, the tracker's backbone; see
                        :func:`conv_features`), pool, FC256 for pre-training as a classifier
``mlp``                 hidden widths from ``hidden=`` (default 800-800)
``mlp_2x800``           784-800-800-10 (Nøkland's MNIST network)
``mlp_3x800``           in-800-800-800-out
``mlp_3x1000``          in-1000-1000-1000-out
``resnet20``            He et al. (2016), the CIFAR ResNet-20: conv16, 3 stages x 3 basic blocks
                        (16, 32, 64 channels; two 3x3 convs with batch norm each), option A
                        shortcuts, global average pooling, FC (:class:`ResNet20`)
``rnn``, ``gru``,       recurrent (:class:`RecurrentNet`): ``layers`` stacked ``nn.RNNCell`` /
``lstm``                ``nn.GRUCell`` / ``nn.LSTMCell`` of ``hidden_size`` units (default 1 x 128)
                        unrolled over the input's rows, and a linear head on the last step (or on
                        every step, for language modelling)
======================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "RECURRENT_MODELS",
    "BasicBlock",
    "LayerCost",
    "ModelStats",
    "RecurrentNet",
    "ResNet20",
    "build_model",
    "cnn",
    "conv_features",
    "count_parameters",
    "layer_costs",
    "mlp",
    "model_stats",
    "training_macs",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}") from None


def _scaled(width: int, factor: float) -> int:
    return max(1, round(width * factor))


def _fc_stack(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    activation: str,
    batch_norm: bool,
    dropout: float,
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_features, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(_activation(activation))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (800, 800),
    activation: str = "tanh",
    batch_norm: bool = False,
    dropout: float = 0.0,
    width: float = 1.0,
    bottleneck: int | None = None,
    trainable_units: int | None = None,
) -> nn.Sequential:
    """A fully connected network on flattened inputs.

    ``bottleneck=b`` makes the middle hidden layer ``b`` units wide: Launay et al.'s (2019)
    bottleneck, 3072-800-b-800-10 for ``mlp_3x800`` on CIFAR-10. ``trainable_units=b`` instead keeps
    the layer's width and trains only its first ``b`` units (the others keep their initial weights).
    """
    hidden = [_scaled(h, width) for h in hidden]
    if bottleneck is not None:
        if not hidden or bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1 and needs hidden layers, got {bottleneck}")
        hidden[len(hidden) // 2] = bottleneck
    model = nn.Sequential(
        nn.Flatten(),
        *_fc_stack(
            math.prod(input_shape),
            hidden,
            num_classes,
            activation=activation,
            batch_norm=batch_norm,
            dropout=dropout,
        ),
    )
    if hidden:  # module-wise DFA: the hidden stack is one module
        model.feedback_modules = (f"1..{len(model) - 2}",)
    if trainable_units is not None:
        middle = [m for m in model if isinstance(m, nn.Linear)][len(hidden) // 2]
        if not 0 <= trainable_units <= middle.out_features:
            raise ValueError(f"trainable_units must be in 0..{middle.out_features}")
        for param in (middle.weight, middle.bias):
            param.register_hook(_freeze_rows_from(trainable_units))
    return model


def _freeze_rows_from(first: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[first:] = 0  # frozen units: no update from any optimiser without weight decay
        return grad

    return hook


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    convs: Sequence[int | str],
    kernel_size: int = 3,
    pool: tuple[int, int] = (2, 2),
    head: Sequence[int] = (256, 256),
    activation: str = "relu",
    batch_norm: bool = False,
    dropout: float = 0.0,
    width: float = 1.0,
) -> nn.Sequential:
    """A plain conv net: ``convs`` lists channel counts, ``"M"`` a max-pool; then an FC head.

    Convolutions keep the spatial size (padding ``kernel_size // 2``); ``pool = (kernel, stride)``.
    Dropout applies to the FC head only.
    """
    channels, height, wide = input_shape
    layers: list[nn.Module] = []
    for item in convs:
        if item == "M":
            layers.append(nn.MaxPool2d(pool[0], pool[1]))
            height = (height - pool[0]) // pool[1] + 1
            wide = (wide - pool[0]) // pool[1] + 1
            continue
        out = _scaled(int(item), width)
        layers.append(nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(_activation(activation))
        channels = out
    if height < 1 or wide < 1:
        raise ValueError(f"input {tuple(input_shape)} is too small for this conv stack")
    flatten = len(layers)
    layers.append(nn.Flatten())
    layers += _fc_stack(
        channels * height * wide,
        [_scaled(h, width) for h in head],
        num_classes,
        activation=activation,
        batch_norm=batch_norm,
        dropout=dropout,
    )
    model = nn.Sequential(*layers)
    # module-wise DFA: the conv stack and the hidden fully connected stack
    modules = [f"0..{flatten - 1}"] + ([f"{flatten + 1}..{len(layers) - 2}"] if head else [])
    model.feedback_modules = tuple(modules)
    return model


def _nokland_cnn(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Sequential:
    kw.setdefault("activation", "tanh")
    return cnn(
        input_shape,
        num_classes,
        convs=(96, "M", 128, "M", 256, "M"),
        kernel_size=5,
        pool=(3, 2),
        head=(2048, 2048),
        **kw,
    )


def _small_cnn(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Sequential:
    # tanh, not ReLU: under DFA (and the default hybrid) unbounded ReLU units grow without limit,
    # because the projected error does not shrink as they grow (see docs/RESULTS.md, defaults)
    kw.setdefault("activation", "tanh")
    return cnn(input_shape, num_classes, convs=(32, "M", 64, "M", 64, "M"), head=(256, 256), **kw)


def _vgg_cnn(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Sequential:
    kw.setdefault("batch_norm", True)
    convs = (32, 32, "M", 64, 64, "M", 128, 128, "M")
    return cnn(input_shape, num_classes, convs=convs, head=(512, 512), **kw)


def _track_cnn(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Sequential:
    kw.setdefault("activation", "relu")
    return cnn(input_shape, num_classes, convs=(32, "M", 64, "M", 96, "M"), head=(256,), **kw)


class _ShortcutA(nn.Module):
    """He et al.'s option A: the identity, subsampled by ``stride`` and zero-padded with the new
    channels (half before, half after); no parameter."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = (out_channels - in_channels) // 2
        self.after = out_channels - in_channels - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``: two 3x3 convs (the first with the
    block's stride), batch norm after each, the option A shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = _activation(activation)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = _ShortcutA(in_channels, out_channels, stride) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016, "Deep Residual Learning for Image Recognition",
    section 4.2): a 3x3 conv with 16 channels, batch norm and ReLU (``stem``); three stages
    (``stage1``..``stage3``) of 3 :class:`BasicBlock` s with 16, 32 and 64 channels, the first
    block of stages 2 and 3 with stride 2; global average pooling and a linear classifier
    (``fc``). Shortcuts are option A (identity, subsampled and zero-padded where the shape
    changes: no parameter, as in the paper's CIFAR experiments). 0.27 M parameters for 10
    classes. Convs are initialised as He et al. do (``kaiming_normal_``, fan-out), batch norm
    with 1 and 0.

    ``feedback_modules``: the stem and every residual block (10 modules) for module-wise DFA.
    """

    feedback_modules: tuple[str, ...] = ("stem", "stage*.*")

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        activation: str = "relu",
        width: float = 1.0,
        blocks: int = 3,
    ) -> None:
        super().__init__()
        channels = [_scaled(c, width) for c in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels[0]),
            _activation(activation),
        )
        previous = channels[0]
        for stage, c in enumerate(channels, 1):
            stride = 1 if stage == 1 else 2
            units = []
            for b in range(blocks):
                units.append(BasicBlock(previous, c, stride if b == 0 else 1, activation))
                previous = c
            self.add_module(f"stage{stage}", nn.Sequential(*units))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.flatten(self.pool(x)))


def _resnet20(input_shape: Sequence[int], num_classes: int, **kw: Any) -> ResNet20:
    # batch norm is part of He et al.'s architecture: the option is accepted and changes nothing
    kw.pop("batch_norm", None)
    if kw.pop("dropout", 0.0):
        raise ValueError("resnet20 has no hidden fully connected layer for dropout")
    if kw.get("activation") is None:
        kw.pop("activation", None)
    return ResNet20(input_shape, num_classes, **kw)


_CELLS: dict[str, type[nn.RNNCellBase]] = {
    "rnn": nn.RNNCell,
    "gru": nn.GRUCell,
    "lstm": nn.LSTMCell,
}


class RecurrentNet(nn.Module):
    """``layers`` recurrent cells unrolled over time, then a linear head (``head``).

    Input ``(N, C, H, W)`` is read as ``T = H`` time steps of ``C W`` features (sequential
    MNIST: 28 rows of 28 pixels; permuted: ``(N, 1, 784, 1)``, 784 steps of one pixel). With
    ``tokens=V`` the input ``(N, 1, T, 1)`` holds token ids (``0 .. V-1``, as floats) fed as
    one-hot vectors. The cells (``cells.0``, ``cells.1``, ...) are ``nn.RNNCell`` (``tanh`` or
    ``relu``), ``nn.GRUCell`` or ``nn.LSTMCell``, called once per step, layer after layer (all
    ``T`` steps of a layer, then the next): the engine's hooks see every step. The head reads the
    last step's state, ``(N, classes)`` logits, or with ``every_step=True`` every step's,
    ``(N, T, classes)`` (language modelling). Initial states are zero.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        cell: str = "lstm",
        hidden_size: int = 128,
        layers: int = 1,
        tokens: int | None = None,
        every_step: bool = False,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"{cell} needs (C, H, W) inputs (H steps), got {tuple(input_shape)}")
        if cell not in _CELLS:
            raise ValueError(f"cell {cell!r} is not one of {sorted(_CELLS)}")
        if hidden_size < 1 or layers < 1:
            raise ValueError(f"hidden_size and layers must be >= 1, got {hidden_size}, {layers}")
        if cell != "rnn" and activation != "tanh":
            raise ValueError(f"{cell} has its own gates: activation applies to rnn only")
        if activation not in ("tanh", "relu"):
            raise ValueError(f"rnn takes activation tanh or relu, not {activation!r}")
        c, steps, w = input_shape
        if tokens is not None and (c, w) != (1, 1):
            raise ValueError(f"token input must be (1, T, 1), got {tuple(input_shape)}")
        self.kind, self.steps, self.tokens, self.every_step = cell, steps, tokens, every_step
        features = tokens if tokens is not None else c * w
        kwargs: dict[str, Any] = {"nonlinearity": activation} if cell == "rnn" else {}
        self.cells = nn.ModuleList(
            _CELLS[cell](features if i == 0 else hidden_size, hidden_size, **kwargs)
            for i in range(layers)
        )
        self.head = nn.Linear(hidden_size, num_classes)

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The input as ``(N, T, features)``."""
        n, c, steps, w = x.shape
        if self.tokens is not None:
            ids = x.reshape(n, steps).round().long()
            return F.one_hot(ids, self.tokens).to(x.dtype)
        return x.permute(0, 2, 1, 3).reshape(n, steps, c * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{self.kind} takes a padded (N, C, T, W) tensor, got {type(x).__name__}: "
                "variable-length sequences (PackedSequence) are not supported"
            )
        seq = self.sequence(x)
        last = len(self.cells) - 1
        for i, cell in enumerate(self.cells):
            state: Any = None
            outputs = []
            for t in range(seq.shape[1]):
                state = cell(seq[:, t], state)
                outputs.append(state[0] if isinstance(state, tuple) else state)
            if i == last and not self.every_step:
                return self.head(outputs[-1])
            seq = torch.stack(outputs, 1)
        return self.head(seq)


def _recurrent(cell: str) -> Callable[..., RecurrentNet]:
    def build(input_shape: Sequence[int], num_classes: int, **kw: Any) -> RecurrentNet:
        if kw.pop("batch_norm", False):
            raise ValueError(f"{cell} has no batch norm option")
        if kw.pop("dropout", 0.0):
            raise ValueError(f"{cell} has no dropout option")
        kw.pop("trainable_units", None)
        width = kw.pop("width", 1.0)
        kw["hidden_size"] = _scaled(kw.get("hidden_size") or 128, width)
        if kw.get("activation") is None:
            kw.pop("activation", None)
        return RecurrentNet(input_shape, num_classes, cell=cell, **kw)

    build.__doc__ = (
        f"The zoo's ``{cell}``: a :class:`RecurrentNet` of ``nn.{_CELLS[cell].__name__}``."
    )
    return build


def conv_features(model: nn.Sequential) -> nn.Sequential:
    """The convolutional part of a zoo CNN: its modules before ``nn.Flatten``, without the pooling
    that ends them. Shares the model's parameters (a view, not a copy)."""
    modules = list(model)
    end = next((i for i, m in enumerate(modules) if isinstance(m, nn.Flatten)), None)
    if end is None:
        raise ValueError("the model has no nn.Flatten: no convolutional part to take")
    while end > 0 and isinstance(modules[end - 1], nn.MaxPool2d | nn.AvgPool2d):
        end -= 1
    return nn.Sequential(*modules[:end])


def _mlp_preset(hidden: tuple[int, ...]) -> Callable[..., nn.Sequential]:
    def build(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Sequential:
        kw.setdefault("hidden", hidden)
        return mlp(input_shape, num_classes, **kw)

    return build


#: Builders by name: ``MODELS[name](input_shape, num_classes, **options)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "nokland_cnn": _nokland_cnn,
    "small_cnn": _small_cnn,
    "vgg_cnn": _vgg_cnn,
    "track_cnn": _track_cnn,
    "mlp": mlp,
    "mlp_2x800": _mlp_preset((800, 800)),
    "mlp_3x800": _mlp_preset((800, 800, 800)),
    "mlp_3x1000": _mlp_preset((1000, 1000, 1000)),
    "resnet20": _resnet20,
    "rnn": _recurrent("rnn"),
    "gru": _recurrent("gru"),
    "lstm": _recurrent("lstm"),
}

#: The recurrent models of the zoo (options ``hidden_size``, ``layers``, ``tokens``,
#: ``every_step``).
RECURRENT_MODELS: tuple[str, ...] = ("rnn", "gru", "lstm")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options: Any) -> Any:
    """Build zoo model ``name`` for inputs of ``input_shape`` (C, H, W) and ``num_classes`` (an
    ``nn.Sequential``; ``resnet20``: a :class:`ResNet20`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if len(input_shape) != 3 and (name.endswith("_cnn") or name in ("resnet20", *RECURRENT_MODELS)):
        raise ValueError(f"{name} needs (C, H, W) inputs, got {tuple(input_shape)}")
    return MODELS[name](tuple(input_shape), num_classes, **options)


@dataclass(frozen=True)
class LayerCost:
    """One weight layer's size and cost per sample."""

    name: str
    kind: str
    macs: int  #: forward multiply-adds per sample (= those of its weight or input gradient)
    in_units: int  #: numel of the layer's input per sample
    out_units: int  #: numel of its output per sample
    params: int


@dataclass(frozen=True)
class ModelStats:
    """Parameters and forward multiply-adds per sample."""

    params: int
    macs: int
    layers: tuple[LayerCost, ...]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_costs(model: nn.Module, input_shape: Sequence[int]) -> list[LayerCost]:
    """Per-sample cost of every ``nn.Linear``/``nn.Conv*d`` layer, in execution order (one forward
    pass on a zero batch of one sample, on the model's device, without touching its state)."""
    costs: list[LayerCost] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        inp = args[0]
        if isinstance(module, nn.RNNCellBase):  # one call per step: the steps add up
            macs = module.weight_ih.numel() + module.weight_hh.numel()
            if costs and costs[-1].name == names[module]:
                last = costs.pop()
                costs.append(dataclasses.replace(last, macs=last.macs + macs))
                return
        elif isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        else:
            assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs = out[0].numel() * per_output
        out = out[0] if isinstance(out, tuple) else out  # an LSTM cell's (h, c)
        costs.append(
            LayerCost(
                names[module],
                type(module).__name__,
                macs,
                inp[0].numel(),
                out[0].numel(),
                sum(p.numel() for p in module.parameters()),
            )
        )

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNCellBase)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return costs


def model_stats(model: nn.Module, input_shape: Sequence[int]) -> ModelStats:
    """Parameter count and forward multiply-adds per sample of ``model``."""
    costs = layer_costs(model, input_shape)
    return ModelStats(count_parameters(model), sum(c.macs for c in costs), tuple(costs))


def training_macs(
    costs: Sequence[LayerCost],
    cut_before: Sequence[bool],
    num_classes: int,
    projection: int | None = None,
) -> dict[str, int]:
    """Multiply-adds per sample of one training step, counted by layer.

    ``cut_before[i]`` says whether layer ``i``'s input is a feedback point (its input gradient is
    not computed). Counted: the forward pass, every weight gradient (as many MACs as the forward),
    every input gradient that is computed (never for the first layer, whose input needs none), and
    the projection ``e @ B`` (``num_classes`` MACs per unit of every feedback point, or
    ``projection`` when given: the engine's own count, ``DFAEngine.feedback_cost()["total_macs"]``,
    for sparse storage and module-wise DFA, whose feedback points are not layer inputs). For
    plain BP, pass ``cut_before = [False] * len(costs)``.
    """
    forward = sum(c.macs for c in costs)
    input_grads = sum(c.macs for i, c in enumerate(costs) if i > 0 and not cut_before[i])
    if projection is None:
        projection = sum(num_classes * c.in_units for c, cut in zip(costs, cut_before) if cut)
    total = 2 * forward + input_grads + projection
    return {
        "forward": forward,
        "weight_grads": forward,
        "input_grads": input_grads,
        "projection": projection,
        "total": total,
    }
