"""The configuration of a training run: typed, validated when it is built, with its own help.

Every field carries its help text in the dataclass metadata, and fields with a fixed set of values
are enums or are checked against the registries (models, datasets, activations, feedback
structures and storages), so that a typo fails when the configuration is built: in the command
line, or when an experiment file is loaded, before any cell runs. The command line is generated
from these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ._enums import StrEnum
from .data import DATASET_NAMES, canonical_name
from .data.registry import SEQUENCE_DATASETS, TEXT_DATASETS
from .engine import ConvError, Inner, Rule, Scope
from .feedback import PATTERNS, STORAGES, make_pattern
from .kfac import SOLVERS, Preconditioner
from .models import ACTIVATIONS, MODELS, RECURRENT_MODELS

__all__ = [
    "DEFAULT_SEQ_LEN", "OptimizerName", "Schedule", "TrainConfig", "choices", "parse_options"
]  # fmt: skip

#: Characters per training sequence of the text datasets when ``seq_len`` is unset.
DEFAULT_SEQ_LEN = 100


class OptimizerName(StrEnum):
    """The built-in optimisers (``train(optimizer_factory=...)`` takes any other)."""

    SGD = "sgd"
    ADAM = "adam"


class Schedule(StrEnum):
    """The learning-rate schedule over the whole run."""

    CONSTANT = "constant"
    COSINE = "cosine"


def parse_options(text: str | None) -> dict[str, str]:
    """``"density=0.1"`` or ``"kernel=3,dilation=2"`` as a dict of strings (the structure's
    parameters convert them to their types); ``None`` or ``""``: no option."""
    options: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"init_options: want KEY=VALUE[,KEY=VALUE...], got {text!r}")
        options[key.strip()] = value.strip()
    return options


def _field(default: Any, help: str, **choices: Any) -> Any:
    return field(default=default, metadata={"help": help, **choices})


def choices(name: str) -> list[str] | None:
    """The allowed values of config field ``name`` (for ``argparse`` choices), or ``None``."""
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}[name]
    source = meta.get("choices")
    if source is None:
        return None
    if isinstance(source, type) and issubclass(source, Enum):
        return [str(m.value) for m in source]
    return sorted(source) if isinstance(source, dict) else list(source)


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in ``config.json``, rebuilt by :meth:`from_dict`.

    Values are checked when the config is built (``ValueError`` naming the field); enum fields
    accept their string values. :meth:`to_dict` gives plain JSON-ready values.
    """

    dataset: str = _field(
        "digits", "the dataset (digits is embedded, no download)", choices=DATASET_NAMES
    )
    data_dir: str | None = _field(
        None, "folder with the dataset files; unset: $DFATORCH_DATA, else ~/.cache/dfatorch/data"
    )
    download: bool = _field(False, "fetch missing dataset files from the official source")
    label: str = _field("fine", "CIFAR-100 labels: fine (100 classes) or coarse (20)",
                        choices=("fine", "coarse"))  # fmt: skip
    fraction: float = _field(
        1.0, "train on a class-stratified, seeded fraction of the training set"
    )
    val_fraction: float = _field(0.0, "hold out this fraction of the training set for validation")
    val_size: int = _field(
        0,
        "validate on this many class-stratified examples from outside the training subset "
        "(needs fraction < 1; the subset keeps its size)",
    )
    augment: bool | None = _field(
        None, "random crop (4-pixel padding) and horizontal flip; unset: on for CIFAR only"
    )
    permute: bool = _field(
        False,
        "seq-mnist, seq-fashion-mnist: 784 steps of one pixel in a fixed random order (instead of "
        "28 rows of 28 pixels)",
    )
    seq_len: int | None = _field(
        None, f"tinyshakespeare, text: characters per sequence (default {DEFAULT_SEQ_LEN})"
    )
    text_file: str | None = _field(None, "dataset text: the UTF-8 text file to model")
    model: str = _field("small_cnn", "a model of the zoo", choices=MODELS)
    hidden_size: int | None = _field(
        None, "rnn, gru, lstm: units per recurrent layer (default 128; --width multiplies it)"
    )
    num_layers: int | None = _field(None, "rnn, gru, lstm: stacked recurrent layers (default 1)")
    activation: str | None = _field(
        None, "hidden activation; unset: the model's own", choices=ACTIVATIONS
    )
    batch_norm: bool = _field(False, "batch normalisation after every hidden layer")
    dropout: float = _field(0.0, "dropout probability in the fully connected head")
    width: float = _field(1.0, "multiply every hidden width by this")
    bottleneck: int | None = _field(
        None, "MLPs: the width of the middle hidden layer (Launay et al.'s bottleneck)"
    )
    trainable_units: int | None = _field(
        None, "MLPs: train only this many units of the middle hidden layer"
    )
    method: Rule = _field(
        "bdfa",
        "training rule of the hidden layers (direct: dfa, bdfa, dkp; layer-wise: fa, usf, brsf, "
        "frsf, kp)",
        choices=Rule,
    )
    scope: Scope = _field(
        "fc",
        "all (every hidden layer), fc (Han & Yoo's hybrid: conv layers by BP) or module "
        "(module-wise DFA: cuts at module outputs only, which receive e @ B_M; dfa/bdfa/dkp)",
        choices=Scope,
    )
    modules: str | None = _field(
        None,
        "scope=module: the modules, comma-separated globs over module names (the outermost match "
        "is kept) or FIRST..LAST ranges of sibling modules; unset: the model's own (resnet20: "
        "stem,stage*.*, its stem and residual blocks; the plain CNNs: the conv stack and the FC "
        "stack)",
    )
    inner: Inner = _field(
        "dfa",
        "scope=module: how a module trains inside: dfa (each layer's error from the module's "
        "projected error through a fixed random operator drawn by --init: a dense or sparse "
        "matrix, or a convolution with --init conv) or bp (exact back-propagation)",
        choices=Inner,
    )
    conv_error: ConvError = _field(
        "backprop",
        "hybrid only: backprop (W^T delta of the first DFA layer) or project",
        choices=ConvError,
    )
    init: str = _field(
        "uniform",
        "feedback structure (sparse: a sparse B; conv: random convolutions inside modules, "
        "scope=module with inner=dfa)",
        choices=PATTERNS,
    )
    init_options: str | None = _field(
        None,
        "options of the feedback structure, KEY=VALUE[,...]: sparse density=D (each unit "
        "connected to max(1, round(D x classes)) classes; default 0.1); conv kernel=K,dilation=D,"
        "groups=G (default 3,1,1)",
    )
    storage: str = _field(
        "dense",
        "feedback storage (packed: 1 bit a weight, bdfa only; sparse: the non-zeros, for "
        "init=sparse)",
        choices=STORAGES,
    )
    gain: float = _field(1.0, "multiply every feedback scale by this")
    normalize_feedback: bool = _field(True, "scale feedback entries by 1/sqrt(layer width)")
    epochs: int = _field(20, "number of epochs")
    batch_size: int = _field(64, "mini-batch size")
    optimizer: OptimizerName = _field("adam", "optimiser", choices=OptimizerName)
    lr: float = _field(1e-3, "learning rate")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(0.0, "L2 weight decay")
    schedule: Schedule = _field("constant", "learning-rate schedule", choices=Schedule)
    seed: int = _field(0, "seeds data order, augmentation, initialisation and feedback")
    device: str = _field("auto", "auto (CUDA if available), cpu, cuda, cuda:1, ...")
    channels_last: bool = _field(False, "channels-last memory format for conv nets")
    eval_test: bool = _field(True, "evaluate on the test set (off for tuning runs)")
    eval_every: int = _field(1, "evaluate every N epochs (and after the last)")
    align_every: int = _field(0, "log gradient alignment every N steps (0: off)")
    activation_bits: int = _field(
        32,
        "store the activations kept for the backward pass at 8 or 4 bits (32: exact float); "
        "the forward pass stays exact",
        choices=(32, 8, 4),
    )
    divergence_factor: float = _field(
        3.0,
        "stop when the moving average of the training loss exceeds this multiple of the first "
        "step's loss (0: off; a non-finite loss always stops)",
    )
    private: bool = _field(
        False,
        "differentially private training: Poisson-sampled batches, each example's update clipped "
        "to --clip, Gaussian noise, epsilon logged (DP-SGD for bp, DP-DFA/DP-BDFA otherwise)",
    )
    target_epsilon: float | None = _field(
        None, "private: the epsilon to end training at (the noise multiplier is found for it)"
    )
    noise_multiplier: float | None = _field(
        None, "private: the noise's standard deviation over --clip (instead of --target-epsilon)"
    )
    delta: float = _field(1e-5, "private: the delta of (epsilon, delta); must be below 1/N")
    clip: float = _field(1.0, "private: the bound on each example's update norm")
    private_engine: str = _field(
        "native",
        "private: who computes per-example updates: native (linear and conv layers, fast) or "
        "opacus (any layer opacus supports)",
        choices=("native", "opacus"),
    )

    preconditioner: Preconditioner = _field(
        "none",
        "precondition the gradients before the optimiser step: none, or kfac (K-FAC, Pauloski "
        "et al. 2020; under DFA from the signal each layer receives)",
        choices=Preconditioner,
    )
    kfac_method: str = _field(
        "eigen",
        "kfac: eigen (eigendecompositions, damping at every step) or inverse (factored "
        "damping, inverses)",
        choices=SOLVERS,
    )
    kfac_damping: float = _field(0.003, "kfac: the damping lambda")
    kfac_factor_decay: float = _field(0.95, "kfac: running-average decay of the factors")
    kfac_kl_clip: float = _field(0.001, "kfac: the KL-clip kappa (0: no clipping)")
    kfac_factor_steps: int = _field(1, "kfac: update the factors every N steps")
    kfac_inv_steps: int = _field(10, "kfac: recompute the decompositions every N steps")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            source = f.metadata.get("choices")
            value = getattr(self, f.name)
            if source is None or value is None:
                continue
            if isinstance(source, type) and issubclass(source, Enum):
                setattr(self, f.name, _member(source, value, f.name))
            elif f.name == "dataset":
                self.dataset = canonical_name(value)
            elif value not in source:
                options = ", ".join(map(str, choices(f.name) or []))
                raise ValueError(f"{f.name}={value!r} is not one of {options}")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.align_every < 0:
            raise ValueError(f"align_every must be >= 0, got {self.align_every}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int):
            raise ValueError(f"val_size must be a whole number of examples, got {self.val_size!r}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.val_size and self.val_fraction:
            raise ValueError("set val_size or val_fraction, not both")
        if self.val_size and self.fraction == 1:
            raise ValueError(
                "val_size draws validation examples from outside the training subset: "
                "it needs fraction < 1 (use val_fraction to carve them out of the whole set)"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "dropout", "divergence_factor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dropout >= 1:
            raise ValueError(f"dropout must be < 1, got {self.dropout}")
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if self.bottleneck is not None and not self.model.startswith("mlp"):
            raise ValueError(f"bottleneck applies to the MLPs, not to {self.model}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        make_pattern(self.init, **parse_options(self.init_options))  # bad options fail now
        if self.modules is not None and self.scope is not Scope.MODULE:
            raise ValueError(f"modules applies to scope=module, not scope={self.scope.value}")
        if self.scope is Scope.MODULE and self.align_every:
            raise ValueError("align_every: alignment probes do not support scope=module")
        self._check_sequences()
        if self.private:
            self._check_private()
        self._check_kfac()

    def _check_sequences(self) -> None:
        recurrent = self.model in RECURRENT_MODELS
        for name in ("hidden_size", "num_layers", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("hidden_size", "num_layers"):
            if getattr(self, name) is not None and not recurrent:
                raise ValueError(f"{name} applies to the recurrent models rnn, gru, lstm")
        if self.permute and self.dataset not in SEQUENCE_DATASETS:
            raise ValueError(f"permute applies to {', '.join(SEQUENCE_DATASETS)}")
        if self.seq_len is not None and self.dataset not in TEXT_DATASETS:
            raise ValueError(f"seq_len applies to the text datasets {', '.join(TEXT_DATASETS)}")
        if (self.text_file is not None) != (self.dataset == "text"):
            raise ValueError("text_file and dataset=text go together: --dataset text --text-file F")
        if self.dataset in TEXT_DATASETS and not recurrent:
            raise ValueError(
                f"{self.dataset} is language modelling: it needs a recurrent model (rnn, gru, lstm)"
            )
        if not recurrent:
            return
        if Rule(self.method) not in (Rule.BP, Rule.DFA, Rule.BDFA):
            raise ValueError(f"{self.model} trains by bp, dfa or bdfa, not {self.method}")
        refused = {
            "scope=module": self.scope is Scope.MODULE,
            "align_every": self.align_every > 0,
            "private": self.private,
            "preconditioner": self.preconditioner is not Preconditioner.NONE,
            "init=norm_matched": self.init == "norm_matched",
        }
        for what, used in refused.items():
            if used:
                raise ValueError(f"{what} is not supported with the recurrent model {self.model}")

    def _check_kfac(self) -> None:
        if not self.kfac_damping > 0:
            raise ValueError(f"kfac_damping must be > 0, got {self.kfac_damping}")
        if not 0 <= self.kfac_factor_decay < 1:
            raise ValueError(f"kfac_factor_decay must be in [0, 1), got {self.kfac_factor_decay}")
        if not self.kfac_kl_clip >= 0:
            raise ValueError(f"kfac_kl_clip must be >= 0 (0: off), got {self.kfac_kl_clip}")
        for name in ("kfac_factor_steps", "kfac_inv_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.private and self.preconditioner is not Preconditioner.NONE:
            raise ValueError(
                "private: K-FAC's factors are computed from the training data outside the "
                "clipped and noised update (not private); train without --preconditioner"
            )

    def kfac_options(self) -> dict[str, Any]:
        """The :class:`~dfatorch.kfac.KFACPreconditioner` options this configuration sets."""
        return {
            "compute_method": self.kfac_method,
            "damping": self.kfac_damping,
            "factor_decay": self.kfac_factor_decay,
            "kl_clip": self.kfac_kl_clip or None,
            "factor_update_steps": self.kfac_factor_steps,
            "inv_update_steps": self.kfac_inv_steps,
        }

    def _check_private(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("private: give exactly one of target_epsilon and noise_multiplier")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if self.private_engine == "opacus" and self.channels_last:
            raise ValueError(
                "private: opacus computes wrong per-example conv gradients on channels-last "
                "tensors (it unfolds them as NCHW); use --private-engine native or drop "
                "--channels-last"
            )
        if self.batch_norm:
            raise ValueError(
                "private: batch norm mixes the examples of a batch, which is not differentially "
                "private; train without it (--no-batch-norm)"
            )
        if Rule(self.method).learns_feedback:
            raise ValueError(
                f"private: {self.method} learns its feedback from the data outside the clipped "
                "and noised update; use a fixed-feedback method"
            )
        if self.align_every:
            raise ValueError("private: alignment probes (align_every) look at the training data "
                             "outside the privacy accounting; turn them off")  # fmt: skip

    def module_list(self) -> list[str] | None:
        """:attr:`modules` as a list (``None``: the model's own)."""
        if self.modules is None:
            return None
        return [m.strip() for m in self.modules.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (enums as strings), as saved in ``config.json`` and checkpoints."""
        return {
            k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict` output, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**data)


def _member(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"{name}={value!r} is not one of {options}") from None
