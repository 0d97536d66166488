"""Attach DFA, binary DFA, the hybrid BP+DFA of Han & Yoo (2019) and the feedback-alignment
family (FA, sign-symmetry, Kolen-Pollack, Direct Kolen-Pollack) to an unchanged model.

How it works (one ordinary ``loss.backward()`` does everything):

- *Layers* are the model's ``nn.Linear`` and ``nn.Conv{1,2,3}d`` modules, in registration order;
  the last is the *output layer*. Each hidden layer has a :class:`Rule`.
- A hidden layer under ``dfa``/``bdfa`` gets its error at its *feedback point*: the input of the
  next layer, i.e. its output after nonlinearity, normalisation, pooling, dropout and flattening. A
  forward pre-hook on that next layer stashes the tensor and hands the layer a detached copy, which
  cuts the graph: autograd never computes the ``W^T delta`` product that DFA would throw away.
- A forward hook on the output layer passes its output ``y`` through one autograd Function together
  with the stashed feedback points. In backward that Function receives the true output error
  ``e = dLoss/dy`` of the user's real loss and returns ``e @ B_l`` as the gradient of every feedback
  point, computed as one matmul ``e @ [B_1 | B_2 | ...]`` and split into views. Autograd then runs
  each segment's own backward: ``f'(a_l)``, batch norm, pooling and the weight gradients, unchanged.
- A layer under ``bp`` places no cut: its output's gradient is back-propagated from the next layer.
- A hidden layer under a *layer-wise* rule (``fa``, ``usf``, ``brsf``, ``frsf``, ``kp``; see
  :mod:`dfatorch.layerwise`) gets the error of the next layer sent back through a matrix ``B`` of
  that layer's weight shape instead of its weight. The next layer's pre-hook hands it a detached
  input (so autograd never computes ``W^T delta``), and its forward hook passes its output through
  an identity autograd Function (:class:`_SendBack`) that also takes the un-detached input: in
  backward it returns ``delta @ B`` (or the transposed convolution with kernel ``B``) for the input,
  while autograd computes the exact weight gradient from ``delta`` and the detached input.
- ``dkp`` (Direct Kolen-Pollack) is ``dfa`` whose ``B_l`` is an ``nn.Parameter`` of the engine; the
  output Function sets its gradient to ``e^T h_l`` (see :class:`_DeliverFeedback`).

The engine therefore assumes that, along the DFA-trained part of the model, each feedback point
reaches the output only through the next layer (a chain). Skip connections inside a BP part are
fine; one that bypasses a cut is detected on the first pass and refused.

``scope="module"`` (module-wise DFA, :mod:`dfatorch.modulewise`) cuts at module outputs instead:
a forward hook on each module (:class:`_ExitHook`) stashes its output, which receives
``g_M = e @ B_M`` from the same single projection; with ``inner="dfa"`` the inputs of the
module's later layers are cut too (*inner points*) and receive ``A_l(g_M)``, a fixed random
operator of the module's projected error, computed in the same backward call.

*Recurrent layers* (``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``: an unrolled cell called once
per time step) may run ``T`` times in a row in one forward pass. Under ``dfa``/``bdfa`` their
feedback point is their own output: a forward hook (:class:`_StepHook`) stashes each step's hidden
state ``h_t`` and returns it detached (for an LSTM cell ``(h_t, c_t)`` both detached), so that the
state carried to step ``t + 1`` and the input of the layer above carry no gradient: nothing flows
back through time nor through ``W_hh^T``. With ``a_t`` the cell's pre-activations,

- last-step loss (logits ``(N, C)``, error ``e``): every step gets ``dL/dh_t := e @ B_l``;
- every-step loss (logits ``(N, T, C)``, errors ``e_t``): step ``t`` gets ``e_t @ B_l``, all
  ``T`` steps projected by one matmul ``[e_1; ...; e_T] @ B`` of ``(N T, C)`` by ``(C, D)``;

and autograd runs each step's own backward, e.g. for ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)``:
``dW_hh = sum_t ((e_t B_l) * tanh'(a_t))^T h_{t-1}``, ``dW_ih = sum_t ((e_t B_l) * tanh'(a_t))^T
x_t`` (``h_{t-1}``, ``x_t`` constants). Under ``bp`` a recurrent layer is left alone: BPTT.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ._enums import StrEnum
from .feedback import (
    FeedbackInit,
    FeedbackMatrix,
    Pattern,
    PatternStorage,
    Storage,
    make_pattern,
    make_storage,
)
from .layerwise import LAYER_FEEDBACK, LayerFeedback, backward_products, conv_geometry
from .modulewise import (
    FeedbackOperator,
    Inner,
    ModuleInfo,
    make_operator,
    operator_from_layout,
    resolve_modules,
)

__all__ = [
    "ConvError",
    "DFAEngine",
    "Inner",
    "LayerInfo",
    "Rule",
    "Scope",
    "Transform",
    "attach",
    "get_rng_states",
    "preserved_state",
    "set_rng_states",
]

#: Modules that carry a rule: the weight layers of the model.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Recurrent cells: layers that may run once per time step in one forward pass (see the module
#: docstring); their feedback point under a direct rule is their output ``h_t`` at every step.
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNCellBase,)

#: Parametrised modules that may sit inside a segment: they are trained by the gradient that
#: arrives at them, like the layer they follow.
SEGMENT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)

#: A transform of the output error ``(N, C)`` or of the projected signal ``(N, D)``.
Transform = Callable[[Tensor], Tensor]


class Rule(StrEnum):
    """How a hidden layer receives the error at its output.

    *Direct* rules project the output error ``e`` onto the layer (``e @ B_l``, one matmul for all
    layers); *layer-wise* rules send the next layer's error back through a matrix ``B`` of that
    layer's weight shape in place of its weight (:mod:`dfatorch.layerwise` says how each ``B`` is
    made). ``kp`` and ``dkp`` learn their ``B``: it is a parameter of the engine
    (``engine.parameters()``), to be put in the optimiser with the model's.
    """

    BP = "bp"  #: back-propagated from the layer above (exact gradient)
    DFA = "dfa"  #: ``e @ B_l`` with a fixed random float matrix (Nøkland 2016)
    BDFA = "bdfa"  #: ``e @ B_l`` with ``B_l`` in ``{-s_l, +s_l}`` (Han & Yoo 2019)
    FA = "fa"  #: ``delta_{l+1} @ B_{l+1}``, ``B`` fixed random (Lillicrap et al. 2016)
    USF = "usf"  #: ``B = s * sign(W)`` (uniform sign-concordant feedback, Liao et al. 2016)
    BRSF = "brsf"  #: ``B = |M_t| o sign(W)``, ``M_t`` redrawn every batch
    FRSF = "frsf"  #: ``B = |M| o sign(W)``, ``M`` drawn once
    KP = "kp"  #: ``B`` learned by the Kolen-Pollack rule (Akrout et al. 2019)
    DKP = "dkp"  #: ``e @ B_l`` with ``B_l`` learned (Webster, Choi & Ahn 2020)

    @property
    def is_feedback(self) -> bool:
        """Any rule but ``bp``."""
        return self is not Rule.BP

    @property
    def is_direct(self) -> bool:
        """The output error is projected onto the layer (``dfa``, ``bdfa``, ``dkp``)."""
        return self in (Rule.DFA, Rule.BDFA, Rule.DKP)

    @property
    def is_layerwise(self) -> bool:
        """The next layer's error comes back through its ``B`` (``fa``, ``usf``, ``brsf``,
        ``frsf``, ``kp``)."""
        return self.value in LAYER_FEEDBACK

    @property
    def learns_feedback(self) -> bool:
        """The feedback is an ``nn.Parameter`` trained alongside the weights (``kp``, ``dkp``)."""
        return self in (Rule.KP, Rule.DKP)

    @property
    def feedback_kind(self) -> str:
        """What the feedback is, for storage messages: ``float``, ``binary``, ``sign-derived`` or
        ``learned`` (``none`` for ``bp``)."""
        if self is Rule.BP:
            return "none"
        if self.learns_feedback:
            return "learned"
        if self in (Rule.USF, Rule.BRSF, Rule.FRSF):
            return "sign-derived"
        return "binary" if self is Rule.BDFA else "float"


class Scope(StrEnum):
    """Which hidden layers a method other than ``bp`` covers."""

    ALL = "all"  #: every hidden layer, convolutional and linear, takes the method
    FC = "fc"  #: the paper's hybrid: hidden linear layers by the method, the conv part by BP
    #: module-wise DFA (Han et al. 2020, our reading): cuts at module outputs only, which receive
    #: ``e @ B_M``; inside, DFA from the module's error (``inner="dfa"``) or BP (``"bp"``)
    MODULE = "module"


class ConvError(StrEnum):
    """Where the conv stack's error comes from in the hybrid (``scope="fc"``)."""

    #: (a) back-propagated from the first DFA-trained linear layer's delta, ``W^T delta``
    BACKPROP = "backprop"
    #: (b) by the method too: a projection ``e @ B`` of its own, straight onto the conv stack's
    #: output, for a direct rule; ``B^T delta`` of the first linear layer for a layer-wise rule
    PROJECT = "project"


@dataclass
class LayerInfo:
    """A weight layer seen by the engine."""

    name: str
    module: nn.Module
    rule: Rule
    is_output: bool = False

    @property
    def recurrent(self) -> bool:
        """A recurrent cell, which may run once per time step (:data:`RECURRENT_TYPES`)."""
        return isinstance(self.module, RECURRENT_TYPES)


@dataclass(frozen=True)
class _Routing:
    """Which feedback block and time step each point of a pass takes, when some layer ran more
    than once or the output is a sequence: ``slots[i]`` is point ``i``'s block of ``B``,
    ``steps[i]`` its step within that block, ``layouts`` one per block."""

    slots: tuple[int, ...]
    steps: tuple[int, ...]
    layouts: tuple[tuple[torch.Size, tuple[int, ...]], ...]


class _DeliverFeedback(torch.autograd.Function):
    """Identity on ``y``; backward returns ``e @ B_l`` as the gradient of each feedback point.

    The learned blocks of ``dkp`` points come after the ``count`` points; their gradient is the
    Direct Kolen-Pollack update ``dB_l = e^T h_l`` (``e`` after the error transforms, ``h_l`` the
    point, ``(N, d_l)`` in logical order): the gradient a direct forward connection ``h_l -> y``
    would receive (Webster, Choi & Ahn 2020; the authors' code, ``webstah/dkp-gist``,
    ``utils/gradfunctions.py``). The last ``inner`` inputs are the inner points of module-wise
    DFA; each gets its operator applied to its module's projected error (``A_l(e @ B_M)``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        engine: DFAEngine,
        count: int,
        inner: int,
        routing: _Routing | None,
        y: Tensor,
        *rest: Tensor,
    ) -> Tensor:
        points = rest[:count]
        ctx.engine, ctx.count, ctx.inner, ctx.routing = engine, count, inner, routing
        # shape and strides of each point, to hand back its gradient in the same layout
        ctx.layouts = [(p.shape, p.stride()) for p in points]
        if len(rest) > count + inner:
            assert engine.feedback is not None
            ctx.save_for_backward(*(points[i] for i in engine.feedback.learned_index))
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        needs = ctx.needs_input_grad[5 : 5 + ctx.count]
        tail = ctx.needs_input_grad[5 + ctx.count :]
        learned, inner = tail[: len(tail) - ctx.inner], tail[len(tail) - ctx.inner :]
        if not any(needs) and not any(learned) and not any(inner):
            return (None, None, None, None, grad_y, *([None] * (len(needs) + len(tail))))
        if ctx.routing is not None:  # recurrent steps (no learned or inner points: refused)
            steps = ctx.engine._step_signals(grad_y, ctx.routing)
            return (
                None, None, None, None, grad_y,
                *(s if n else None for s, n in zip(steps, needs)),
            )  # fmt: skip
        signals, error = ctx.engine._project(grad_y, ctx.layouts)  # views of one (N, D) product
        updates = [
            error.T @ h.reshape(h.shape[0], -1).to(error.dtype) if n else None
            for h, n in zip(ctx.saved_tensors, learned)
        ]
        inner_grads = ctx.engine._inner_signals(signals, inner)
        return (
            None,
            None,
            None,
            None,
            grad_y,
            *(s if n else None for s, n in zip(signals, needs)),
            *updates,
            *inner_grads,
        )


class _SendBack(torch.autograd.Function):
    """Identity on a layer's output ``y`` (marked dirty: no copy); backward passes ``delta`` on to
    ``y`` unchanged (the layer's exact weight gradient follows) and returns ``delta @ B`` (or the
    transposed convolution with kernel ``B``) as the gradient of the layer's un-detached input
    ``x``; for ``kp`` also ``W``'s own gradient ``delta^T x`` as the gradient of ``B``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, feedback: LayerFeedback, module: nn.Module, y: Tensor, x: Tensor, *learned: Tensor
    ) -> Tensor:
        ctx.feedback, ctx.module = feedback, module
        ctx.save_for_backward(x)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        feedback: LayerFeedback = ctx.feedback
        need_input = ctx.needs_input_grad[3]
        need_weight = feedback.learned and ctx.needs_input_grad[4]
        tail = (None,) if feedback.learned else ()
        if not (need_input or need_weight):
            return (None, None, grad, None, *tail)
        (x,) = ctx.saved_tensors
        weight = ctx.module.weight
        matrix = feedback.matrix(weight) if need_input else weight.detach()
        grad_x, grad_b = backward_products(
            feedback.geometry, grad, x, matrix, need_input=need_input, need_weight=need_weight
        )
        return (None, None, grad, grad_x, *((grad_b,) if feedback.learned else ()))


class _PassState:
    """What the hooks track during one forward pass (and the switches they read)."""

    __slots__ = (
        "capture", "checked", "enabled", "held", "inner", "next", "owner", "recording", "stash",
        "versions",
    )  # fmt: skip

    def __init__(self) -> None:
        self.next = 0  # index of the layer expected to run next
        self.stash: list[Tensor] = []  # feedback points of the pass in progress
        # per stashed point, its version counter when stashed: dkp's update reads the point
        self.versions: list[int] = []
        self.owner: list[int] = []  # per stashed point, its block of B (its slot)
        self.inner: list[Tensor] = []  # inner points of module-wise DFA
        self.held: dict[int, Tensor] = {}  # un-detached inputs of layers with a layer-wise B
        self.enabled = True
        self.checked = False  # the chain check ran (first pass only)
        self.capture: list[Tensor] | None = None
        self.recording: list[Tensor | None] | None = None

    def reset(self) -> None:
        """A new forward pass starts: nothing stashed, the first layer expected."""
        self.next = 0
        self.stash = []
        self.versions = []
        self.owner = []
        self.inner = []
        self.held = {}
        if self.capture is not None:
            self.capture.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> _PassState:
        # a copied model starts with no pass in progress (the stash holds graph tensors)
        fresh = _PassState()
        fresh.enabled = self.enabled
        return fresh


class _PreHook:
    """The forward pre-hook of layer ``index``: checks the order, stashes and cuts.

    An object rather than a closure, so that ``copy.deepcopy`` of the model copies it together
    with its engine: the copy trains with its own engine state.
    """

    __slots__ = ("cut", "engine", "index", "inner", "name", "recurrent", "slot", "through")

    def __init__(self, engine: DFAEngine, index: int) -> None:
        self.engine = engine
        self.index = index
        self.recurrent = engine.layers[index].recurrent  # may run again right after itself
        self.slot = engine._slot.get(index - 1, -1)  # the block of B of the point it cuts
        kind = engine._plan[index]
        self.cut = kind == "cut"  # the input is a feedback point: stash and detach
        self.through = kind == "through"  # the error goes back through this layer's B
        self.inner = kind == "inner"  # an inner point of module-wise DFA: stash and detach
        self.name = engine.layers[index].name

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        state, index = self.engine._pass, self.index
        # a recurrent layer's next time step (the model's own pre-hook starts every pass)
        repeat = self.recurrent and state.next == index + 1
        if index == 0 and not repeat:
            if self.engine._recurrent and state.next != 0:  # _StartHook starts passes here
                raise RuntimeError(
                    f"layer {self.name!r} ran again after other layers in one forward pass: "
                    "a recurrent stack must run layer by layer (all time steps of a cell, then "
                    "the next cell), not step by step through the stack"
                )
            state.reset()
        if index != state.next and not repeat:
            layers = self.engine.layers
            expected = layers[state.next].name if state.next < len(layers) else None
            raise RuntimeError(
                f"layer {self.name!r} ran where {expected!r} was expected: the "
                "engine needs the layers to run once each, in registration order, starting "
                "from the first (only a recurrent cell, nn.RNNCell/GRUCell/LSTMCell, may run "
                "again, right after itself: one call per time step; pass output=... to "
                "attach() if the last registered layer is not the output layer)"
            )
        state.next = index + 1
        if index == 0:
            return None
        point = args[0] if args else None
        if not isinstance(point, Tensor):
            raise TypeError(f"layer {self.name!r} got a non-tensor input")
        if state.capture is not None:
            state.capture.append(point)
        recording = state.recording
        if recording is not None and point.requires_grad:
            point.register_hook(lambda g, i=index - 1: recording.__setitem__(i, g.detach()))
        if not (
            (self.cut or self.through or self.inner) and state.enabled and torch.is_grad_enabled()
        ):
            return None
        if self.cut:
            state.stash.append(point)
            state.versions.append(point._version)
            state.owner.append(self.slot)
        elif self.inner:
            state.inner.append(point)
        else:
            state.held[index] = point
        return (point.detach(), *args[1:])


class _ThroughHook:
    """The forward hook of a layer whose input's error comes back through its ``B`` (the
    ``position``-th entry of ``engine.layerwise``): wraps its output in :class:`_SendBack`."""

    __slots__ = ("engine", "index", "position")

    def __init__(self, engine: DFAEngine, index: int, position: int) -> None:
        self.engine = engine
        self.index = index
        self.position = position

    def __call__(self, module: nn.Module, args: tuple[Any, ...], y: Any) -> Any:
        x = self.engine._pass.held.pop(self.index, None)
        if x is None or not isinstance(y, Tensor):
            return None
        feedback = self.engine.layerwise[self.position]
        if feedback.scales.device != y.device:  # the model moved: the feedback follows
            feedback.to(y.device)
        learned = (feedback.weight,) if feedback.learned else ()
        return _SendBack.apply(feedback, module, y, x, *learned)


class _ExitHook:
    """The forward hook of module ``index``'s last module under ``scope="module"``: checks that
    the module's layers have all run, stashes its output (a feedback point) and returns a detached
    copy: the graph is cut at the module's output."""

    __slots__ = ("engine", "index")

    def __init__(self, engine: DFAEngine, index: int) -> None:
        self.engine = engine
        self.index = index

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        engine = self.engine
        state, info = engine._pass, engine.module_infos[self.index]
        if state.next != info.layers[-1] + 1:
            ran = engine.layers[state.next - 1].name if state.next else None
            raise RuntimeError(
                f"module {info.name!r} returned after layer {ran!r}, but its last layer is "
                f"{engine.layers[info.layers[-1]].name!r}: a module must end right after its last "
                "layer, once per forward"
            )
        if not (state.enabled and torch.is_grad_enabled()):
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"module {info.name!r} returned {type(output).__name__}; module-wise DFA needs a "
                "tensor output"
            )
        state.stash.append(output)
        state.versions.append(output._version)
        return output.detach()


class _StepHook:
    """The forward hook of a recurrent layer under a direct rule: its output ``h_t`` (an LSTM
    cell's ``(h_t, c_t)``: ``h_t``) is this step's feedback point, stashed; the output is
    returned detached, so that neither the next step (``W_hh h_t``, ``c_t``) nor the layer above
    sends any gradient back to it: it receives ``e @ B_l`` (or ``e_t @ B_l``) only."""

    __slots__ = ("engine", "index", "slot")

    def __init__(self, engine: DFAEngine, index: int) -> None:
        self.engine = engine
        self.index = index
        self.slot = engine._slot[index]

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        state = self.engine._pass
        if not (state.enabled and torch.is_grad_enabled()):
            return None
        h = output[0] if isinstance(output, tuple) else output
        if not isinstance(h, Tensor) or h.dim() != 2:
            shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(
                f"recurrent layer {self.engine.layers[self.index].name!r} returned {shape}; "
                "DFA needs batched (batch, hidden) states"
            )
        state.stash.append(h)
        state.versions.append(h._version)
        state.owner.append(self.slot)
        if isinstance(output, tuple):
            return tuple(o.detach() if isinstance(o, Tensor) else o for o in output)
        return h.detach()


class _StartHook:
    """The forward pre-hook of the model itself, for engines with a recurrent layer: every call
    of the model starts a pass (the first layer may run several times in a row, so its own
    call cannot tell a new pass from the next time step)."""

    __slots__ = ("engine",)

    def __init__(self, engine: DFAEngine) -> None:
        self.engine = engine

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.engine._pass.reset()


class _OutputHook:
    """The forward hook of the output layer (see :meth:`DFAEngine._deliver`)."""

    __slots__ = ("engine",)

    def __init__(self, engine: DFAEngine) -> None:
        self.engine = engine

    def __call__(self, module: nn.Module, args: tuple[Any, ...], y: Any) -> Any:
        return self.engine._deliver(y)


_HOOK_TYPES = (_PreHook, _ThroughHook, _ExitHook, _StepHook, _StartHook, _OutputHook)


def _hook_dicts(module: nn.Module) -> tuple[dict[int, Any], ...]:
    return (module._forward_pre_hooks, module._forward_hooks)


def attached_engine(model: nn.Module) -> DFAEngine | None:
    """The engine whose hooks are on ``model``, or ``None``."""
    for module in model.modules():
        for hooks in _hook_dicts(module):
            for hook in hooks.values():
                if isinstance(hook, _HOOK_TYPES):
                    return hook.engine
    return None


class DFAEngine(nn.Module):
    """The hooks and feedback that train a model by one of the :class:`Rule` s. Create it with
    :func:`attach`.

    The engine is an ``nn.Module`` so that its feedback follows the usual conventions: buffers in
    :meth:`state_dict`, moved by ``.to()``. It is not part of the model (the model's own
    ``state_dict`` is unchanged); the feedback also follows the model's device on its own. The
    direct feedback (``dfa``, ``bdfa``, ``dkp``) is :attr:`feedback`, built on the first pass; the
    layer-wise feedback is :attr:`layerwise`, one module per layer whose weight it replaces, built
    at once. Learned feedback (``kp``, ``dkp``) is in :meth:`parameters`: put it in the optimiser,
    ``torch.optim.SGD([*model.parameters(), *engine.parameters()], ...)``; its gradient is set by
    the backward pass like any parameter's, so that the optimiser's learning rate, weight decay
    and momentum apply to it as to the weights.
    """

    feedback: FeedbackMatrix | None
    layerwise: nn.ModuleList

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerInfo],
        *,
        num_classes: int | None,
        init: Pattern,
        storage: PatternStorage,
        seed: int,
        gain: float,
        normalize: bool = True,
        error_transforms: Sequence[Transform] = (),
        signal_transforms: Sequence[Transform] = (),
        modules: Sequence[ModuleInfo] | None = None,
        inner: Inner | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: keep the model's state apart
        self.layers = layers
        #: module-wise DFA: the modules (empty for the other scopes) and how they train inside
        self.module_infos: list[ModuleInfo] = list(modules or [])
        self.inner_mode: Inner | None = inner if self.module_infos else None
        # where each layer's input is cut: "cut" (a direct feedback point), "through" (a
        # layer-wise B), "inner" (an inner point of module-wise DFA) or None
        self._plan: list[str | None] = [None] * len(layers)
        #: the direct feedback points in order: (name, rule); layers, or modules
        self.points: list[tuple[str, Rule]] = []
        #: per inner point, in order: (index of its module, index of the layer whose input it is)
        self._inner_plan: list[tuple[int, int]] = []
        if self.module_infos:
            for m, info in enumerate(self.module_infos):
                rule = layers[info.layers[0]].rule
                self.points.append((info.name, rule))
                if self.inner_mode is Inner.DFA:
                    for i in info.layers[1:]:
                        self._plan[i] = "inner"
                        self._inner_plan.append((m, i))
        else:
            for index, below in enumerate(layers[:-1], 1):
                self._plan[index] = (
                    None  # a recurrent layer's point is its output, cut by its _StepHook
                    if below.recurrent
                    else "cut"
                    if below.rule.is_direct
                    else "through"
                    if below.rule.is_layerwise
                    else None
                )
            self.points = [(i.name, i.rule) for i in layers[:-1] if i.rule.is_direct]
        #: the block of ``B`` (the slot) of each layer with a direct rule, by layer index
        self._slot: dict[int, int] = {}
        if not self.module_infos:
            direct = [i for i, info in enumerate(layers[:-1]) if info.rule.is_direct]
            self._slot = {i: k for k, i in enumerate(direct)}
        self._recurrent = any(info.recurrent for info in layers)
        #: the inner operators of module-wise DFA (``inner="dfa"``), built with the feedback
        self.operators = nn.ModuleList()
        self.num_classes = num_classes
        self.structure = init
        self.store = storage
        self.seed = seed
        self.gain = gain
        self.normalize = normalize
        self.feedback = None
        self.calibrated = False
        self.error_transforms = list(error_transforms)
        self.signal_transforms = list(signal_transforms)
        # transforms that are modules keep their state (a generator, say) in this state_dict
        self.transforms = nn.ModuleList(
            [
                t
                for t in (*self.error_transforms, *self.signal_transforms)
                if isinstance(t, nn.Module)
            ]
        )
        # mutable per-pass state lives in a plain object: nn.Module.__setattr__ is slow (hot path)
        self._pass = _PassState()
        # built before any hook is placed: a layer the rule cannot serve leaves the model untouched
        self.layerwise = nn.ModuleList()
        through: dict[int, int] = {}
        for index, (below, info) in enumerate(itertools.pairwise(layers), 1):
            if below.rule.is_layerwise:
                rule = below.rule.value
                through[index] = len(self.layerwise)
                self.layerwise.append(
                    LAYER_FEEDBACK[rule](
                        rule,
                        info.name,
                        info.module.weight,
                        conv_geometry(info.module, info.name, rule),
                        init=init,
                        storage=copy.copy(storage),
                        seed=seed * 1_000_003 + 500_009 + index,
                        gain=gain,
                        normalize=normalize,
                    )
                )
        if self._recurrent:
            model.register_forward_pre_hook(_StartHook(self))
        for index, info in enumerate(layers):
            info.module.register_forward_pre_hook(_PreHook(self, index))
            if index in through:
                info.module.register_forward_hook(_ThroughHook(self, index, through[index]))
            if info.recurrent and info.rule.is_direct:
                info.module.register_forward_hook(_StepHook(self, index))
        for index, module in enumerate(self.module_infos):
            module.exit.register_forward_hook(_ExitHook(self, index))
        layers[-1].module.register_forward_hook(_OutputHook(self))

    # -- public API --------------------------------------------------------------------------

    model: nn.Module

    @property
    def rules(self) -> dict[str, Rule]:
        """The rule of every layer by name (the output layer reports ``bp``: its true gradient)."""
        return {info.name: info.rule for info in self.layers}

    @property
    def feedback_layers(self) -> list[str]:
        """Names of the feedback points that receive a projected error, in order: the layers of
        direct rules or, under ``scope="module"``, the modules."""
        return [name for name, _ in self.points]

    @property
    def modules_of_layers(self) -> dict[str, str]:
        """Under ``scope="module"``: the module of every hidden layer, by layer name."""
        return {self.layers[i].name: m.name for m in self.module_infos for i in m.layers}

    @property
    def inner_points(self) -> list[tuple[str, str]]:
        """Under ``scope="module"``, ``inner="dfa"``: ``(module, layer)`` per inner point, in
        order, ``layer`` being the one whose output it is (the next layer's input)."""
        return [(self.module_infos[m].name, self.layers[i - 1].name) for m, i in self._inner_plan]

    @property
    def layer_feedback(self) -> dict[str, LayerFeedback]:
        """The layer-wise feedback by the name of the hidden layer it serves (its ``B`` has the
        shape of the next layer's weight; ``.name`` names that layer)."""
        served = [info.name for info in self.layers[:-1] if info.rule.is_layerwise]
        return dict(zip(served, self.layerwise))  # type: ignore[arg-type]

    def _own_hooks(self) -> Iterator[tuple[dict[int, Any], int]]:
        hooked = [info.module for info in self.layers] + [m.exit for m in self.module_infos]
        if self._recurrent:
            hooked.append(self.model)
        for module in dict.fromkeys(hooked):
            for hooks in _hook_dicts(module):
                for key, hook in list(hooks.items()):
                    if isinstance(hook, _HOOK_TYPES) and hook.engine is self:
                        yield hooks, key

    @property
    def attached(self) -> bool:
        return next(self._own_hooks(), None) is not None

    def remove(self) -> None:
        """Remove every hook: the model trains by plain back-propagation again."""
        for hooks, key in list(self._own_hooks()):
            del hooks[key]
        self._pass.stash = []
        self._pass.versions = []
        self._pass.owner = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this context, forward passes are plain back-propagation (no cuts)."""
        state = self._pass
        previous, state.enabled = state.enabled, False
        try:
            yield
        finally:
            state.enabled = previous

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of feedback held: ``{"pattern": ..., "scales": ...}``: the direct feedback (0
        before the first pass) and the layer-wise feedback's patterns or learned matrices (0 for
        ``usf``/``brsf``, derived from ``W`` at each step)."""
        held = {"pattern": 0, "scales": 0}
        if self.feedback is not None:
            held = self.feedback.storage_bytes()
        for fb in self.layerwise:
            assert isinstance(fb, LayerFeedback)
            held["pattern"] += fb.stored_bytes()
            held["scales"] += fb.scales.numel() * fb.scales.element_size()
        for op in self.operators:
            assert isinstance(op, FeedbackOperator)
            held["pattern"] += op.nbytes()
            held["scales"] += op.scales.numel() * op.scales.element_size()
        return held

    def feedback_cost(self) -> dict[str, int]:
        """What the feedback holds and what projecting it costs, from the engine's own structures
        (build the feedback first: :meth:`materialize`):

        - ``points``, ``units``: the direct feedback points and their units ``D``;
        - ``pattern_bytes``, ``scale_bytes``: the direct ``B`` as its storage keeps it (with the
          learned blocks of ``dkp`` beside the pattern they started from);
        - ``inner_points``, ``inner_bytes``: module-wise DFA's inner operators;
        - ``layerwise_bytes``: the layer-wise rules' ``B`` (patterns or learned matrices);
        - ``projection_macs``: multiply-adds per sample of ``e @ B`` (``C * D``, or the non-zeros
          of a ``sparse`` storage); ``inner_macs``: of the inner operators;
        - ``total_bytes`` (scales included) and ``total_macs``.
        """
        if self.feedback is None and self.points:
            raise RuntimeError("the feedback is not built yet: call engine.materialize(x) first")
        cost = dict.fromkeys(
            ("points", "units", "pattern_bytes", "scale_bytes", "inner_points", "inner_bytes",
             "layerwise_bytes", "projection_macs", "inner_macs"),
            0,
        )  # fmt: skip
        if self.feedback is not None:
            held = self.feedback.storage_bytes()
            cost.update(
                points=len(self.feedback.sizes),
                units=self.feedback.total_size,
                pattern_bytes=held["pattern"],
                scale_bytes=held["scales"],
                projection_macs=self.feedback.projection_macs(),
            )
        for op in self.operators:
            assert isinstance(op, FeedbackOperator)
            cost["inner_points"] += 1
            cost["inner_bytes"] += op.nbytes()
            cost["scale_bytes"] += op.scales.numel() * op.scales.element_size()
            cost["inner_macs"] += op.macs()
        for fb in self.layerwise:
            assert isinstance(fb, LayerFeedback)
            cost["layerwise_bytes"] += fb.stored_bytes()
            cost["scale_bytes"] += fb.scales.numel() * fb.scales.element_size()
        cost["total_bytes"] = sum(
            cost[k] for k in ("pattern_bytes", "scale_bytes", "inner_bytes", "layerwise_bytes")
        )
        cost["total_macs"] = cost["projection_macs"] + cost["inner_macs"]
        return cost

    def input_cuts(self) -> list[bool]:
        """Per layer, whether the engine detaches its input, so that no gradient of that input is
        computed: after a direct rule's layer, after a module's output and at inner points
        (``scope="module"``). A layer-wise rule's cut is not counted: its ``B`` product replaces
        ``W^T delta`` at the same cost."""
        cuts = [kind in ("cut", "inner") for kind in self._plan]
        for index, below in enumerate(self.layers[:-1], 1):  # cut at a recurrent layer's output
            cuts[index] |= below.recurrent and below.rule.is_direct
        for module in self.module_infos:
            cuts[module.layers[-1] + 1] = True
        return cuts

    def materialize(self, example_input: Any) -> DFAEngine:
        """Build the feedback now from one forward pass on ``example_input`` (a tensor or a tuple of
        arguments), instead of lazily on the first training pass. Model and RNG state are kept."""
        if self.feedback is not None or not self.feedback_layers:
            return self
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        with preserved_state(self.model), torch.enable_grad():
            self.model(*args)
        if self.feedback is None:
            raise RuntimeError("the example forward pass did not reach the output layer")
        return self

    @property
    def hidden_layers(self) -> list[str]:
        """Names of the hidden layers (every layer but the output layer), in order."""
        return [info.name for info in self.layers[:-1]]

    @contextlib.contextmanager
    def capturing(self) -> Iterator[list[Tensor]]:
        """Within: every hidden layer's output (the next layer's input) is collected, in order,
        as the forward pass runs (the list restarts when the first layer runs again)."""
        self._refuse_recurrent("capturing()")
        captured: list[Tensor] = []
        self._pass.capture = captured
        try:
            yield captured
        finally:
            self._pass.capture = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Tensor | None]]:
        """Within: the gradient each hidden layer's output receives in backward is recorded (one
        slot per hidden layer: ``e @ B_l`` at a DFA layer, the back-propagated gradient at a BP
        layer). Forward and backward must both run inside."""
        self._refuse_recurrent("recording()")
        slots: list[Tensor | None] = [None] * (len(self.layers) - 1)
        self._pass.recording = slots
        try:
            yield slots
        finally:
            self._pass.recording = None

    def _refuse_recurrent(self, what: str) -> None:
        if self._recurrent:
            raise ValueError(
                f"{what} collects one tensor per hidden layer; a recurrent layer has one per time "
                "step: not supported (alignment probes, norm_matched, calibrate)"
            )

    def true_signals(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Tensor, Any], Tensor],
    ) -> tuple[Tensor, list[Tensor]]:
        """Back-propagation's gradient at every hidden layer's output, for comparison with DFA's.

        Runs one plain BP forward/backward (no cuts) on ``inputs`` and returns ``(e, grads)``: the
        output error ``dL/dy`` and ``dL/dh_l`` at each hidden layer's output, flattened to
        ``(N, d_l)``. Parameter ``.grad``, buffers and RNG states are left as they were.
        """
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        with preserved_state(self.model), torch.enable_grad():
            with self.capturing() as points, self.disabled():
                y = self.model(*args)
            loss = loss_fn(y, targets)
            _check_scalar_loss(loss)
            grads = torch.autograd.grad(loss, [y, *points], allow_unused=True)
        flat = [
            (g if g is not None else torch.zeros_like(p)).reshape(p.shape[0], -1)
            for g, p in zip(grads[1:], points)
        ]
        return grads[0].detach(), [g.detach() for g in flat]

    @torch.no_grad()
    def calibrate(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[[Tensor, Any], Tensor],
    ) -> list[float]:
        """Set each feedback point's scale so that ``||e B_l||`` equals BP's ``||dL/dh_l||`` on this
        batch (the *norm-matched* initialisation). Returns the new scales."""
        if self.module_infos:
            raise ValueError(
                "calibrate() matches each layer's projected error to BP's; under "
                "scope='module' the errors arrive at module outputs: not supported"
            )
        self.materialize(inputs)
        if self.feedback is None:
            raise ValueError("calibrate() scales direct feedback (dfa, bdfa); this engine has none")
        if any(self.feedback.learned):
            raise ValueError("calibrate() sets fixed scales; a learned feedback (dkp) has none")
        error, true = self.true_signals(inputs, targets, loss_fn)
        true = [t for info, t in zip(self.layers, true) if info.rule.is_direct]
        delivered, _ = self._signals(error, None)
        for i, (d, t) in enumerate(zip(delivered, true)):
            dn, tn = d.norm(), t.norm()
            if dn > 0 and tn > 0:
                self.feedback.scales[i] *= (tn / dn).to(self.feedback.scales.dtype)
        self.calibrated = True
        return self.feedback.scales.tolist()

    # -- hooks -------------------------------------------------------------------------------

    def _deliver(self, y: Any) -> Any:
        """After the output layer: route ``y`` and the stashed points through the Function."""
        state = self._pass
        if state.next != len(self.layers):  # pragma: no cover - the pre-hooks catch this first
            raise RuntimeError("the output layer ran before every layer had run")
        if not (state.enabled and torch.is_grad_enabled()):
            return None
        points, state.stash = state.stash, []
        versions, state.versions = state.versions, []
        owners, state.owner = state.owner, []
        inner, state.inner = state.inner, []
        sequence = self._recurrent and isinstance(y, Tensor) and y.dim() == 3
        if not isinstance(y, Tensor) or not (y.dim() == 2 or sequence):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"the output layer {self.layers[-1].name!r} returned {shape}; DFA needs "
                "(batch, classes) logits (or (batch, steps, classes) for a recurrent model)"
            )
        if self.num_classes is not None and y.shape[-1] != self.num_classes:
            raise ValueError(
                f"the output has {y.shape[-1]} units but the feedback is for {self.num_classes}"
            )
        if not points:
            return None
        routing = self._routing(y, points, owners) if self._recurrent else None
        # one point per block of B: the first step of each recurrent layer stands for all
        firsts = points if routing is None else [points[routing.slots.index(k)]
                                                 for k in range(len(self.points))]  # fmt: skip
        if self.feedback is None:
            self._build_feedback(y, firsts, inner)
        else:
            self._check_sizes(firsts, inner)
        if not state.checked:
            _check_chain(y, points)
            if self.module_infos:
                self._check_modules(points, inner)
            state.checked = True
        assert self.feedback is not None
        for i in self.feedback.learned_index:  # a detached copy shares the version counter
            if points[i]._version != versions[i]:
                raise RuntimeError(
                    f"the output of {self.feedback.names[i]!r} was changed in place after it "
                    "was cut (an in-place op such as ReLU(inplace=True) after it?): dkp's "
                    "update e^T h needs it unchanged; make that op out-of-place"
                )
        return _DeliverFeedback.apply(
            self, len(points), len(inner), routing, y, *points, *self.feedback.learned_blocks,
            *inner,
        )  # fmt: skip

    def _routing(self, y: Tensor, points: list[Tensor], owners: list[int]) -> _Routing:
        """The block and time step of every point of a pass of a recurrent model; checks that
        every layer with a direct rule gave its points and, for a sequence output ``(N, T, C)``,
        that each is a recurrent layer that ran exactly ``T`` steps."""
        counts = [owners.count(k) for k in range(len(self.points))]
        missing = [self.points[k][0] for k, c in enumerate(counts) if c == 0]
        if missing or len(owners) != len(points):  # pragma: no cover - the hooks ran in order
            raise RuntimeError(f"layers {missing} gave no feedback point in this pass")
        seen = [0] * len(self.points)
        steps = []
        first: list[Tensor | None] = [None] * len(self.points)
        for point, k in zip(points, owners):
            steps.append(seen[k])
            seen[k] += 1
            start = first[k]
            if start is None:
                first[k] = point
            elif point.shape != start.shape:
                raise ValueError(
                    f"the state of layer {self.points[k][0]!r} changed from {tuple(start.shape)} "
                    f"to {tuple(point.shape)} between steps: variable-length sequences (shrinking "
                    "batches, packed sequences) are not supported; pad them to one length"
                )
        if y.dim() == 3:
            if self.error_transforms or self.signal_transforms:
                raise ValueError(
                    "error and signal transforms act per example on (batch, classes) errors; "
                    "with (batch, steps, classes) outputs they are not supported"
                )
            recurrent = {self._slot[i] for i, info in enumerate(self.layers) if info.recurrent
                         and i in self._slot}  # fmt: skip
            for k, (name, _) in enumerate(self.points):
                if k not in recurrent:
                    raise ValueError(
                        f"with (batch, steps, classes) outputs every DFA layer must be "
                        f"recurrent; {name!r} is not (give it rule 'bp')"
                    )
                if counts[k] != y.shape[1]:
                    raise ValueError(
                        f"recurrent layer {name!r} ran {counts[k]} steps but the output has "
                        f"{y.shape[1]}: with a loss on every step, each step's state gets that "
                        "step's error"
                    )
        layouts = tuple(
            (points[owners.index(k)].shape, points[owners.index(k)].stride())
            for k in range(len(self.points))
        )
        return _Routing(tuple(owners), tuple(steps), layouts)

    # -- internals ---------------------------------------------------------------------------

    def _build_feedback(self, y: Tensor, points: list[Tensor], inner: list[Tensor]) -> None:
        if self.num_classes is None:
            self.num_classes = int(y.shape[1])
        self.feedback = FeedbackMatrix(
            self.num_classes,
            [p[0].numel() for p in points],
            binary=[rule is Rule.BDFA for _, rule in self.points],
            init=self.structure,
            storage=copy.copy(self.store),
            seed=self.seed,
            gain=self.gain,
            normalize=self.normalize,
            names=[name for name, _ in self.points],
            learned=[rule.learns_feedback for _, rule in self.points],
        ).to(y.device)
        for block in self.feedback.learned_blocks:  # learned in the model's precision
            block.data = block.data.to(y.dtype)
        if len(inner) != len(self._inner_plan):  # pragma: no cover - the hooks ran in order
            raise RuntimeError(f"{len(inner)} inner points, {len(self._inner_plan)} expected")
        for j, (point, (m, i)) in enumerate(zip(inner, self._inner_plan)):
            module = self.module_infos[m]
            self.operators.append(
                make_operator(
                    self.structure,
                    tuple(points[m].shape[1:]),
                    tuple(point.shape[1:]),
                    seed=self.seed * 1_000_003 + 900_001 + j,
                    binary=self.points[m][1] is Rule.BDFA,
                    gain=self.gain,
                    normalize=self.normalize,
                    name=f"from {module.name!r} to the output of layer {self.layers[i - 1].name!r}",
                ).to(y.device)
            )

    def _check_sizes(self, points: list[Tensor], inner: Sequence[Tensor] = ()) -> None:
        assert self.feedback is not None
        for point, size, name in zip(points, self.feedback.sizes, self.feedback.names):
            units = point.numel() // max(point.shape[0], 1)
            if units != size:
                what = "module" if self.module_infos else "layer"
                raise ValueError(
                    f"the output of {what} {name!r} has {units} units per sample, but "
                    f"its feedback was built for {size} (input size changed?)"
                )
        for point, op, (m, _) in zip(inner, self.operators, self._inner_plan):
            assert isinstance(op, FeedbackOperator)
            shapes = (tuple(points[m].shape[1:]), tuple(point.shape[1:]))
            if shapes != (op.source, op.target):
                raise ValueError(
                    f"the inner feedback {op.name} was built for {op.source} -> {op.target}, but "
                    f"this pass has {shapes[0]} -> {shapes[1]} (input size changed?)"
                )

    def _check_modules(self, points: list[Tensor], inner: list[Tensor]) -> None:
        """First pass, module-wise: every inner point is computed from the output of the layer
        before it, and reaches its module's output only through its cut."""
        for m, module in enumerate(self.module_infos):
            mine = [(p, i) for p, (k, i) in zip(inner, self._inner_plan) if k == m]
            for point, i in mine:
                before = self.layers[i - 1]
                weight = getattr(before.module, "weight", None)
                needed = isinstance(weight, Tensor) and weight.requires_grad
                if needed and not _reaches(point, weight):
                    raise ValueError(
                        f"inner='dfa': the input of layer {self.layers[i].name!r} is not computed "
                        f"from the output of {before.name!r}, the layer before it in module "
                        f"{module.name!r}: DFA within a module needs its layers to form a chain "
                        "(use inner='bp', or modules that are chains)"
                    )
            try:
                _check_chain(points[m], [p for p, _ in mine])
            except ValueError:
                raise ValueError(
                    f"inner='dfa': in module {module.name!r}, the output of a layer reaches the "
                    "module's output by a path that bypasses the next layer (a skip connection "
                    "around an inner cut?): use inner='bp' for such modules"
                ) from None

    def _inner_signals(self, signals: list[Tensor], needs: Sequence[bool]) -> list[Tensor | None]:
        """``A_l(g_M)`` for every inner point that needs it, ``g_M`` its module's projected
        error (a view of the one projection)."""
        out: list[Tensor | None] = []
        for op, (m, _), need in zip(self.operators, self._inner_plan, needs):
            if not need:
                out.append(None)
                continue
            signal = signals[m]
            if op.scales.device != signal.device:  # the model moved: the feedback follows
                op.to(signal.device)
            out.append(op(signal))
        return out

    def _step_signals(self, error: Tensor, routing: _Routing) -> list[Tensor]:
        """The signal of every point of a recurrent model's pass, from one projection.

        Last-step loss (``error`` ``(N, C)``): ``e @ B`` once, each step of layer ``k`` taking
        the view ``e @ B_k``. Every-step loss (``error`` ``(N, T, C)``): the steps stacked,
        ``(N T, C) @ (C, D)`` in one matmul, step ``t`` of layer ``k`` taking ``e_t @ B_k``.
        """
        if error.dim() == 2:
            blocks, _ = self._project(error, list(routing.layouts))
            return [blocks[k] for k in routing.slots]
        n, t, c = error.shape
        blocks, _ = self._project(error.reshape(n * t, c), None)
        per_step = [b.view(n, t, -1) for b in blocks]  # (N, T, d_k) views of one product
        return [per_step[k][:, s] for k, s in zip(routing.slots, routing.steps)]

    def _project(
        self, error: Tensor, like: list[tuple[torch.Size, tuple[int, ...]]] | None
    ) -> tuple[list[Tensor], Tensor]:
        if self.structure.name == FeedbackInit.NORM_MATCHED.value and not self.calibrated:
            raise RuntimeError(
                "init='norm_matched' needs engine.calibrate(inputs, targets, loss_fn) on a batch "
                "before the first training step"
            )
        return self._signals(error, like)

    def _signals(
        self, error: Tensor, like: list[tuple[torch.Size, tuple[int, ...]]] | None
    ) -> tuple[list[Tensor], Tensor]:
        """The error transforms, one projection ``e @ B``, the signal transforms, then the split
        into one view per feedback point: the whole feedback path. Returns the views and the
        transformed error (what ``dkp``'s update multiplies)."""
        assert self.feedback is not None
        if self.feedback.scales.device != error.device:
            self.feedback.to(error.device)
        for transform in self.error_transforms:
            error = transform(error)
        signal = self.feedback.signal(error, like)
        for transform in self.signal_transforms:
            signal = transform(signal)
        return self.feedback.split(signal, like), error

    def _modules_state(self) -> dict[str, Any] | None:
        if not self.module_infos:
            return None
        assert self.inner_mode is not None
        return {"names": [m.name for m in self.module_infos], "inner": self.inner_mode.value}

    def get_extra_state(self) -> dict[str, Any]:
        state = {
            "rules": {info.name: info.rule.value for info in self.layers},
            "calibrated": self.calibrated,
            "layout": None if self.feedback is None else self.feedback.layout(),
        }
        if self.module_infos:
            state["modules"] = self._modules_state()
            built = self.feedback is not None
            state["operators"] = [op.layout() for op in self.operators] if built else None
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = {info.name: info.rule.value for info in self.layers}
        if state.get("rules") != mine:
            raise ValueError(f"saved rules {state.get('rules')} do not match this engine's {mine}")
        if state.get("modules") != self._modules_state():
            raise ValueError(
                f"saved modules {state.get('modules')} do not match this engine's "
                f"{self._modules_state()}"
            )
        self.calibrated = bool(state.get("calibrated", False))

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Feedback is built lazily; a checkpoint may arrive before the first pass: build it from
        # the saved layout so that the buffers below have somewhere to go.
        extra = state_dict.get(prefix + "_extra_state")
        layout = extra.get("layout") if isinstance(extra, dict) else None
        if self.feedback is None and layout is not None:
            self.feedback = FeedbackMatrix.from_layout(layout, gain=self.gain)
            self.num_classes = layout["num_classes"]
            operators = extra.get("operators") if isinstance(extra, dict) else None
            if not len(self.operators) and operators:
                for op_layout in operators:
                    self.operators.append(operator_from_layout(op_layout, gain=self.gain))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        rules = ", ".join(f"{i.name}={i.rule.value}" for i in self.layers[:-1])
        text = f"output={self.layers[-1].name!r}, rules=({rules}), init={self.structure.name}"
        if self.module_infos:
            assert self.inner_mode is not None
            names = ", ".join(m.name for m in self.module_infos)
            text += f", modules=({names}), inner={self.inner_mode.value}"
        return text


def _check_scalar_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(f"the loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar, got shape {tuple(loss.shape)} (reduce it, e.g. .mean())"
        )


def _reaches(root: Tensor, param: Tensor) -> bool:
    """Whether ``root`` was computed from ``param`` (a walk of its autograd graph)."""
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is param:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _check_chain(y: Tensor, points: list[Tensor]) -> None:
    """Refuse graphs where a feedback point reaches the output other than through its cut.

    Walks the autograd graph of the output and of every segment once (on the first pass). A walk
    from segment ``k`` must not meet the node of an earlier feedback point: if it does, that point's
    gradient would be a mix of the projected error and back-propagation.
    """
    nodes = [p.grad_fn for p in points]
    roots = [y, *points[::-1]]
    for k, root in enumerate(roots):
        # the output segment may meet no point; segment of point j only points before j
        limit = len(points) if k == 0 else len(points) - k
        forbidden = {n: i for i, n in enumerate(nodes[:limit]) if n is not None}
        if not forbidden or root.grad_fn is None:
            continue
        seen: set[Any] = set()
        stack = [root.grad_fn]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in forbidden and node is not root.grad_fn:
                raise ValueError(
                    "a feedback point reaches the output by a path that bypasses its cut (a skip "
                    f"connection around a DFA layer?): feedback point #{forbidden[node]} of "
                    f"{len(points)}. DFA needs a chain; set such layers to 'bp' with rules=..."
                )
            stack.extend(n for n, _ in node.next_functions if n is not None)


def _layer_list(model: nn.Module, output: str | None) -> list[tuple[str, nn.Module]]:
    kinds = LAYER_TYPES + RECURRENT_TYPES
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no layer the engine can train: it needs nn.Linear, "
            "nn.Conv1d/2d/3d or recurrent cell (nn.RNNCell/GRUCell/LSTMCell) modules"
        )
    if output is not None:
        names = [n for n, _ in found]
        if output not in names:
            raise ValueError(f"output={output!r} is not one of the model's layers: {names}")
        found.append(found.pop(names.index(output)))
    return found


def _execution_order(
    model: nn.Module, found: list[tuple[str, nn.Module]], example_input: Any, output: str | None
) -> list[tuple[str, nn.Module]]:
    """Reorder ``found`` as the layers run on ``example_input`` (a no-grad pass, no trace left)."""
    ran: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, (_, m) in enumerate(found)
    ]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with preserved_state(model), torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    # a recurrent cell runs once per time step, in a row: one entry per run of calls
    ran = [i for k, i in enumerate(ran)
           if not (k and ran[k - 1] == i and isinstance(found[i][1], RECURRENT_TYPES))]  # fmt: skip
    twice = sorted({found[i][0] for i in ran if ran.count(i) > 1})
    if twice:
        raise ValueError(f"layers {twice} ran more than once in one forward; DFA needs each once")
    idle = [name for i, (name, _) in enumerate(found) if i not in ran]
    if idle:
        raise ValueError(f"layers {idle} did not run on the example input")
    order = [found[i] for i in ran]
    if output is not None:
        order.append(order.pop([n for n, _ in order].index(output)))
    return order


def _resolve_rules(
    found: list[tuple[str, nn.Module]],
    method: Rule,
    scope: Scope,
    conv_error: ConvError,
    overrides: Mapping[str, Rule | str] | None,
    known: set[str],
) -> list[Rule]:
    hidden = found[:-1]
    rules: list[Rule] = []
    for _name, module in hidden:
        # the hybrid leaves convolutions to BP; linear and recurrent layers take the method
        if method is Rule.BP or scope is not Scope.FC or not isinstance(module, _CONV_TYPES):
            rules.append(method)
        else:
            rules.append(Rule.BP)
    if method.is_feedback and scope is Scope.FC and conv_error is ConvError.PROJECT:
        first_fc = next((i for i, r in enumerate(rules) if r.is_feedback), None)
        if first_fc is not None and first_fc > 0:
            rules[first_fc - 1] = method  # the conv stack's top gets a projection of its own
    for pattern, rule in (overrides or {}).items():
        matched = [i for i, (name, _) in enumerate(found) if fnmatch.fnmatchcase(name, pattern)]
        if not matched and not any(fnmatch.fnmatchcase(n, pattern) for n in known):
            raise ValueError(f"rules: {pattern!r} matches no layer of {[n for n, _ in found]}")
        for i in matched:
            if i == len(found) - 1:
                if Rule(rule).is_feedback:
                    raise ValueError(
                        f"{found[i][0]!r} is the output layer: it is always trained by its true "
                        "gradient and cannot take a feedback rule"
                    )
                continue
            rules[i] = Rule(rule)
    return rules


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_recurrent(layers: Sequence[LayerInfo], scope: Scope) -> None:
    """Refuse, in one line, what the recurrent path does not cover: a recurrent output layer,
    rules other than ``bp``/``dfa``/``bdfa`` on a recurrent layer, module-wise DFA, and a
    recurrent layer fed by a layer with a feedback rule (whose point would be cut per step)."""
    if not any(info.recurrent for info in layers):
        return
    if layers[-1].recurrent:
        raise ValueError(
            f"the output layer {layers[-1].name!r} is a recurrent cell; put an nn.Linear head "
            "on its states"
        )
    if scope is Scope.MODULE:
        raise ValueError("scope='module' does not support recurrent layers: use 'all' or 'fc'")
    for index, info in enumerate(layers[:-1]):
        if not info.recurrent:
            continue
        if info.rule not in (Rule.BP, Rule.DFA, Rule.BDFA):
            raise ValueError(
                f"recurrent layer {info.name!r} takes dfa, bdfa or bp, not {info.rule.value!r}"
            )
        below = layers[index - 1] if index else None
        if below is not None and not below.recurrent and below.rule.is_feedback:
            raise ValueError(
                f"recurrent layer {info.name!r} follows {below.name!r}, trained by "
                f"{below.rule.value!r}: a layer below a recurrent one must be recurrent or 'bp'"
            )


def _check_unsupported(model: nn.Module, overrides: Mapping[str, Any] | None) -> None:
    allowed = LAYER_TYPES + RECURRENT_TYPES + SEGMENT_TYPES
    for name, module in model.named_modules():
        if isinstance(module, allowed) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if overrides and any(
            fnmatch.fnmatchcase(name, p) and Rule(r) is Rule.BP for p, r in overrides.items()
        ):
            continue
        raise ValueError(
            f"module {name!r} ({type(module).__name__}) has parameters but is not a layer type "
            "DFA supports (nn.Linear, nn.Conv1d/2d/3d, normalisation): it would be trained by "
            f"whatever gradient reaches it. Pass rules={{{name!r}: 'bp'}} to accept that."
        )


def attach(
    model: nn.Module,
    method: Rule | str = Rule.DFA,
    *,
    scope: Scope | str = Scope.ALL,
    conv_error: ConvError | str = ConvError.BACKPROP,
    rules: Mapping[str, Rule | str] | None = None,
    modules: Sequence[str] | str | None = None,
    inner: Inner | str | None = None,
    init: Pattern | FeedbackInit | str = FeedbackInit.UNIFORM,
    storage: PatternStorage | Storage | str = Storage.DENSE,
    gain: float = 1.0,
    normalize: bool = True,
    seed: int = 0,
    output: str | None = None,
    example_input: Any = None,
    error_transforms: Sequence[Transform] = (),
    signal_transforms: Sequence[Transform] = (),
) -> DFAEngine:
    """Train ``model`` by DFA, binary DFA, the hybrid or a rule of the feedback-alignment family,
    through hooks; the training loop stays
    ``loss = criterion(model(x), y); loss.backward(); optimizer.step()``.

    Args:
        model: any module whose ``nn.Linear``/``nn.Conv*d`` layers run once each per forward, in
            registration order, the last one producing ``(batch, classes)`` outputs. Recurrent
            cells (``nn.RNNCell``/``GRUCell``/``LSTMCell``) may run once per time step, their
            steps in a row; the output may then be ``(batch, steps, classes)`` (a loss on every
            step). See the module docstring for what each step receives.
        method: a :class:`Rule` for the hidden layers in ``scope``: ``"bp"``; the direct rules
            ``"dfa"``, ``"bdfa"``, ``"dkp"`` (learned ``B_l``); the layer-wise rules ``"fa"``,
            ``"usf"``, ``"brsf"``, ``"frsf"``, ``"kp"`` (learned ``B``). A learned feedback is in
            ``engine.parameters()``: give it to the optimiser (see :class:`DFAEngine`).
        scope: ``"all"``: every hidden layer; ``"fc"``: the paper's hybrid, hidden ``nn.Linear``
            layers by ``method`` and the convolutional part by back-propagation (for a layer-wise
            rule: the conv stack receives ``W^T delta`` of the first linear layer, exactly);
            ``"module"``: module-wise DFA (``dfa``/``bdfa``/``dkp``; our reading of the abstract
            of Han et al. 2020, see :mod:`dfatorch.modulewise`): the graph is cut at the outputs
            of ``modules`` only, each receiving ``e @ B_M`` from the one projection.
        conv_error: in the hybrid, how the conv stack gets its error: ``"backprop"`` (from the first
            linear layer's delta, ``W^T delta``) or ``"project"`` (by the method too: a projection
            of its own onto its output for a direct rule, ``B^T delta`` for a layer-wise one).
        rules: per-layer overrides, ``{name_or_glob: rule}``, applied after the preset (not with
            ``scope="module"``).
        modules: ``scope="module"`` only: the modules, as glob patterns over module names (of
            nested matches the outermost is kept: ``"stage*.*"`` is every residual block of
            ``resnet20``) or ``"FIRST..LAST"`` ranges of sibling modules (``"0..8"``: children 0
            to 8 of an ``nn.Sequential``). Every hidden layer must be in one; the output layer in
            none. Default: the model's ``feedback_modules`` attribute (the zoo's models have one).
        inner: ``scope="module"`` only: ``"dfa"`` (default: every layer of a module whose output
            feeds the next layer of the module receives a fixed random operator of the module's
            projected error, drawn by ``init``: a dense or sparse matrix, or with ``init="conv"``
            a convolution) or ``"bp"`` (exact back-propagation of ``e @ B_M`` inside the module).
        init: the feedback structure: a registered name (the built-in dense ones are listed by
            :class:`~dfatorch.feedback.FeedbackInit`; ``"sparse"`` and ``"conv"`` take options)
            or a :class:`~dfatorch.feedback.Pattern` instance (a structure with options:
            ``SparsePattern(density=0.1)``, ``ConvPattern(kernel=3, dilation=2, groups=4)``).
        storage: ``"dense"``, ``"packed"`` (binary only, 1 bit a weight) or ``"seeded"`` (nothing
            stored, regenerated each step), or another registered
            :class:`~dfatorch.feedback.PatternStorage`; all give the same updates. ``fa`` takes
            ``dense`` or ``seeded``; learned (``kp``, ``dkp``) and sign-derived (``usf``,
            ``brsf``, ``frsf``) feedback only ``dense``.
        gain: a factor on every feedback scale.
        normalize: width-normalised feedback (entries scaled by ``1/sqrt(d)``); ``False`` for
            entries of order 1.
        seed: seeds the feedback patterns.
        output: the name of the output layer, when it is not the last registered layer.
        example_input: if given, the feedback is built now from one forward pass on it;
            otherwise on the first training forward pass. Required by ``dkp``, whose learned
            matrices must exist before the optimiser is built.
        error_transforms: callables applied in order to the output error ``e`` ``(N, C)`` before
            the projection (for example per-example clipping).
        signal_transforms: callables applied in order to the projected signal ``(N, D)`` of all
            feedback points together (blocks of ``engine.feedback.sizes`` columns, each in its
            point's memory order) before it is split per layer (for example added noise).
            Transforms act on the feedback path only: the output layer keeps its true gradient.
            Those that are ``nn.Module`` are saved in the engine's ``state_dict`` (see
            :class:`dfatorch.transforms.RandomTransform` for random ones).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no eligible layer, no hidden layer for a DFA rule, an unsupported parametrised
            module under a DFA rule, an unknown option, a storage or init the rules cannot use,
            modules that name nothing, overlap or leave a hidden layer out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() needs an nn.Module, got {type(model).__name__}")
    method, scope = _enum(Rule, method, "method"), _enum(Scope, scope, "scope")
    conv_error = _enum(ConvError, conv_error, "conv_error")
    inner_mode = None if inner is None else _enum(Inner, inner, "inner")
    structure, store = make_pattern(init), make_storage(storage)
    if scope is not Scope.MODULE and (modules is not None or inner_mode is not None):
        raise ValueError(f"modules= and inner= apply to scope='module', not {scope.value!r}")
    module_wise = scope is Scope.MODULE and method is not Rule.BP
    if module_wise:
        if not method.is_direct:
            raise ValueError(
                f"scope='module' takes method 'dfa', 'bdfa' or 'dkp' (or 'bp'), not "
                f"{method.value!r}"
            )
        if rules:
            raise ValueError(
                "rules= and scope='module' do not combine: modules=[...] place the cuts"
            )
        if structure.name == FeedbackInit.NORM_MATCHED.value:
            raise ValueError("init='norm_matched' calibrates layers; scope='module' cannot use it")
        inner_mode = inner_mode or Inner.DFA
    if structure.operator_kind == "conv" and method is not Rule.BP and inner_mode is not Inner.DFA:
        raise ValueError(
            f"init={structure.name!r} maps a module's error map to its layers' maps: it needs "
            "scope='module' with inner='dfa'"
        )
    for value in (rules or {}).values():
        _enum(Rule, value, "rules")
    if attached_engine(model) is not None:
        raise ValueError("an engine is already attached to this model: call engine.remove() first")
    found = _layer_list(model, output)
    if example_input is not None:
        found = _execution_order(model, found, example_input, output)
    known = {name for name, _ in model.named_modules()}
    layer_rules = _resolve_rules(found, method, scope, conv_error, rules, known)
    layers = [LayerInfo(n, m, r) for (n, m), r in zip(found[:-1], layer_rules)]
    layers.append(LayerInfo(found[-1][0], found[-1][1], Rule.BP, is_output=True))
    _check_recurrent(layers, scope)
    module_infos: list[ModuleInfo] = []
    if module_wise and len(found) > 1:
        specs = modules if modules is not None else getattr(model, "feedback_modules", None)
        if specs is None:
            raise ValueError(
                f"scope='module' needs modules=[...]: {type(model).__name__} names no default "
                "(a feedback_modules attribute, as the zoo's models have)"
            )
        module_infos = resolve_modules(model, specs, found)
        _check_outside_modules(model, module_infos, found[-1][1])
    wants_feedback = method.is_feedback or any(Rule(r).is_feedback for r in (rules or {}).values())
    if wants_feedback:
        if len(found) < 2:
            raise ValueError(
                f"{type(model).__name__} has a single layer ({found[0][0]!r}), the output layer: "
                "there is no hidden layer for DFA to train"
            )
        if not any(info.rule.is_feedback for info in layers):
            raise ValueError(
                f"no hidden layer gets a DFA rule with scope={scope.value!r}: layers are "
                f"{[(n, type(m).__name__) for n, m in found]}"
            )
        if inner_mode is not Inner.BP:  # exact BP inside a module trains any module
            _check_unsupported(model, rules)
        _check_feedback_options(
            [info.rule for info in layers[:-1]], structure, store, example_input is not None
        )
    out = found[-1][1]
    num_classes = out.out_features if isinstance(out, nn.Linear) else None
    engine = DFAEngine(
        model,
        layers,
        num_classes=num_classes,
        init=structure,
        storage=store,
        seed=seed,
        gain=gain,
        normalize=normalize,
        error_transforms=error_transforms,
        signal_transforms=signal_transforms,
        modules=module_infos,
        inner=inner_mode,
    )
    if example_input is not None:
        engine.materialize(example_input)
    return engine


def _check_outside_modules(
    model: nn.Module, modules: Sequence[ModuleInfo], output: nn.Module
) -> None:
    """Refuse a parametrised module in no module of module-wise DFA (but the output layer): it
    would be trained by whatever gradient reaches it."""
    inside: set[int] = set()
    for info in modules:
        inside |= info.members
    inside |= {id(m) for m in output.modules()}
    for name, module in model.named_modules():
        if id(module) in inside or not any(True for _ in module.parameters(recurse=False)):
            continue
        raise ValueError(
            f"module {name!r} ({type(module).__name__}) has parameters but is in no module of "
            "scope='module': name a module that holds it"
        )


def _check_feedback_options(
    rules: Sequence[Rule], structure: Pattern, store: PatternStorage, built_now: bool
) -> None:
    """Refuse, in one line, a storage or init that a rule in use cannot work with."""
    used = list(dict.fromkeys(r for r in rules if r.is_feedback))
    for rule in used:
        kind = rule.feedback_kind
        if kind in ("learned", "sign-derived") and store.name != Storage.DENSE.value:
            raise ValueError(
                f"storage={store.name!r} cannot hold a {kind} feedback ({rule.value}): "
                "use storage='dense'"
            )
        if rule is Rule.FA and store.binary_only:
            raise ValueError(
                f"storage={store.name!r} cannot hold a float feedback (fa): use storage='dense' or "
                "'seeded'"
            )
    if structure.name == FeedbackInit.NORM_MATCHED.value:
        other = [r.value for r in used if r not in (Rule.DFA, Rule.BDFA)]
        if other:
            raise ValueError(
                f"init='norm_matched' calibrates the fixed scales of dfa/bdfa projections; "
                f"{', '.join(other)} cannot use it"
            )
    if Rule.DKP in used and not built_now:
        raise ValueError(
            "dkp learns its feedback matrices, whose shapes come from a forward pass: pass "
            "example_input=... to attach() so that they exist before the optimiser is built"
        )


def _enum(kind: type[Enum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in kind)  # type: ignore[attr-defined]
        raise ValueError(f"{what}={value!r} is not one of {options}") from None


def get_rng_states() -> dict[str, Any]:
    """The CPU and (if present) CUDA RNG states, for :func:`set_rng_states`."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Restore states from :func:`get_rng_states`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a probe pass and leave no trace: buffers (batch-norm statistics), parameter gradients
    and the CPU/accelerator RNG states are restored on exit; so are the layer-wise feedback's
    buffers (``brsf``'s generator states) and the learned feedback's gradients of the engine
    attached to ``model``."""
    engine = attached_engine(model)
    # (module whose buffers, module whose parameters' gradients): the direct feedback's buffers
    # are left out, no pass changes them and they can be large
    owners = [(model, model)] if engine is None else [(model, model), (engine.layerwise, engine)]
    buffers = [
        {
            k: v.detach().clone()
            for k, v in held.state_dict(keep_vars=True).items()
            if not isinstance(v, nn.Parameter) and isinstance(v, Tensor)
        }
        for held, _ in owners
    ]
    grads = [
        {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in o.named_parameters()}
        for _, o in owners
    ]
    devices = [d for d in {p.device for p in model.parameters()} if d.type != "cpu"]
    with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else "cuda"):
        try:
            yield
        finally:
            with torch.no_grad():
                for (held, owner), saved, grad in zip(owners, buffers, grads):
                    state = held.state_dict(keep_vars=True)
                    for k, v in saved.items():
                        state[k].copy_(v)
                    for n, p in owner.named_parameters():
                        if n in grad:  # not one the pass created (materialize builds dkp's)
                            p.grad = grad[n]
