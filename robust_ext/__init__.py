"""robust_ext: fused adversarial-attack ops for PyTorch, with attacks, evaluation and adversarial training."""
from . import ops, reference
from .ops import backend, build_info

__version__ = "0.1.0"
__all__ = ["ops", "reference", "backend", "build_info", "__version__"]
