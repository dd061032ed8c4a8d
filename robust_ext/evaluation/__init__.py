"""Robustness evaluation: robust accuracy per attack and ε, robustness margins, minimal fooling ε by
bisection, transferability, gradient-masking checks, JSON reports and PNG plots.

>>> from robust_ext.evaluation import evaluate
>>> report = evaluate(model, test_set, ["fgsm", "pgd", "noise"], eps=[0.05, 0.1, 0.2, 0.3], plot_dir="out")
>>> print(report.summary()); report.to_json("out/report.json")
>>> aa = autoattack(model, test_set, eps=8/255, norm="linf", version="standard", state_path="aa_state")
"""
from .autoattack import AutoAttackReport, autoattack
from .diagnostics import EvaluationWarning, GradientMaskingWarning, MaskingThresholds, gradient_masking_warnings, \
    zero_gradient_mask
from .margin import minimal_eps
from .metrics import perturbation_norms, robustness_margin, success_rate
from .report import Report
from .runner import evaluate
from .specs import AttackSpec, make_attack
from .trajectory import pgd_trajectory
from .transfer import TransferResult, transfer_matrix

__all__ = ["evaluate", "Report", "autoattack", "AutoAttackReport", "make_attack", "AttackSpec", "minimal_eps",
           "robustness_margin", "success_rate", "perturbation_norms", "transfer_matrix", "TransferResult", "pgd_trajectory",
           "gradient_masking_warnings", "zero_gradient_mask", "MaskingThresholds", "GradientMaskingWarning",
           "EvaluationWarning"]
