"""robust_ext: fused adversarial-attack ops for PyTorch, with attacks, evaluation and adversarial training."""
from . import attacks, ops, reference
from . import batchnorm, pooling  # registers the fused layers' autograd and fake kernels with their ops
from .attacks import BIM, FGSM, FGSM_RS, PGD, bim, fgsm, fgsm_rs, pgd
from .ops import backend, build_info

__version__ = "0.1.0"
__all__ = ["ops", "reference", "attacks", "backend", "build_info", "__version__",
           "FGSM", "FGSM_RS", "BIM", "PGD", "fgsm", "fgsm_rs", "bim", "pgd"]
