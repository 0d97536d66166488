"""The model zoo, with parameter and multiply-add counts.

Every model is a plain ``nn.Sequential`` of standard layers, so :func:`dfatorch.attach` sees its
layers in execution order. Build one by name with :func:`build_model`; ``activation``,
``batch_norm``, ``dropout`` and ``width`` (a multiplier on every hidden width) are options of all.

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
======================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "LayerCost",
    "ModelStats",
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
    trainable_units: int | None = None,
) -> nn.Sequential:
    """A fully connected network on flattened inputs.

    ``trainable_units=b`` trains only the first ``b`` units of the middle hidden layer (the
    others keep their initial weights): the bottleneck of Launay et al. (2019), 3072-800-[b]-800-10.
    """
    hidden = [_scaled(h, width) for h in hidden]
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
    layers.append(nn.Flatten())
    layers += _fc_stack(
        channels * height * wide,
        [_scaled(h, width) for h in head],
        num_classes,
        activation=activation,
        batch_norm=batch_norm,
        dropout=dropout,
    )
    return nn.Sequential(*layers)


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
MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "nokland_cnn": _nokland_cnn,
    "small_cnn": _small_cnn,
    "vgg_cnn": _vgg_cnn,
    "track_cnn": _track_cnn,
    "mlp": mlp,
    "mlp_2x800": _mlp_preset((800, 800)),
    "mlp_3x800": _mlp_preset((800, 800, 800)),
    "mlp_3x1000": _mlp_preset((1000, 1000, 1000)),
}


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **options: Any
) -> nn.Sequential:
    """Build zoo model ``name`` for inputs of ``input_shape`` (C, H, W) and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if len(input_shape) != 3 and name.endswith("_cnn"):
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
        if isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        else:
            assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs = out[0].numel() * per_output
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

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
    costs: Sequence[LayerCost], cut_before: Sequence[bool], num_classes: int
) -> dict[str, int]:
    """Multiply-adds per sample of one training step, counted by layer.

    ``cut_before[i]`` says whether layer ``i``'s input is a feedback point (its input gradient is
    not computed). Counted: the forward pass, every weight gradient (as many MACs as the forward),
    every input gradient that is computed (never for the first layer, whose input needs none), and
    the projection ``e @ B`` (``num_classes`` MACs per unit of every feedback point). For plain BP,
    pass ``cut_before = [False] * len(costs)``.
    """
    forward = sum(c.macs for c in costs)
    input_grads = sum(c.macs for i, c in enumerate(costs) if i > 0 and not cut_before[i])
    projection = sum(num_classes * c.in_units for c, cut in zip(costs, cut_before) if cut)
    total = 2 * forward + input_grads + projection
    return {
        "forward": forward,
        "weight_grads": forward,
        "input_grads": input_grads,
        "projection": projection,
        "total": total,
    }
