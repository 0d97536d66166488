"""dfatorch: Direct Feedback Alignment, binary DFA and hybrid BP+DFA for unchanged PyTorch models.

>>> engine = dfatorch.attach(model, "bdfa", scope="fc")   # doctest: +SKIP
>>> loss = criterion(model(x), y); loss.backward(); optimizer.step()   # doctest: +SKIP
"""

from .compression import ActivationCompression, CompressionStats, compressed_activations
from .engine import ConvError, DFAEngine, LayerInfo, Rule, Scope, attach, preserved_state
from .feedback import FeedbackInit, FeedbackMatrix, Storage

__version__ = "0.1.0"

__all__ = [
    "ActivationCompression",
    "CompressionStats",
    "ConvError",
    "DFAEngine",
    "FeedbackInit",
    "FeedbackMatrix",
    "LayerInfo",
    "Rule",
    "Scope",
    "Storage",
    "__version__",
    "attach",
    "compressed_activations",
    "preserved_state",
]
