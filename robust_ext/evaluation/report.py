"""The result of :func:`~robust_ext.evaluation.evaluate`: plain numbers, JSON in and out, a text summary."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .._io import write_json
from .._json import decode, encode
from ..attacks.threats import norm_label

PathLike = Union[str, "os.PathLike[str]"]
# Only numbers are decoded, so that a model called "inf" stays a string: the free-text parts are skipped,
# and in the config only its numeric entries are decoded.
_TEXT = ("warnings", "plots")
_CONFIG_NUMBERS = ("eps", "clip_min", "clip_max", "large_eps", "target_accuracy")


def _num(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class Report:
    """What an evaluation measured.

    config: the model (name, class, parameter count), data (name, number of samples), attacks with their
        hyper-parameters, ε grid, clip bounds, seed, thresholds, device and versions.
    clean_accuracy: accuracy on the unperturbed samples.
    attacks: per attack name: ``kind``, ``params`` and, one value per ε of ``eps``, ``accuracy`` (robust
        accuracy, see :mod:`robust_ext.evaluation.metrics`), ``success_rate``, ``linf_mean``, ``linf_max``,
        ``l2_mean``, ``l2_max``; and ``margin`` (:func:`~robust_ext.evaluation.robustness_margin`).
    worst_case: per ε, the accuracy when a sample counts as robust only if no attack fools it, and its margin.
    min_eps: the minimal fooling ε of each sample (:func:`~robust_ext.evaluation.minimal_eps`) and their
        median/mean, or None.
    diagnostics: the gradient-masking measurements; warnings: the messages that fired (also issued as
        :class:`~robust_ext.evaluation.GradientMaskingWarning`); timing: seconds per phase.
    """

    config: Dict[str, Any]
    n_samples: int
    clean_accuracy: float
    eps: List[float]
    attacks: Dict[str, Dict[str, Any]]
    worst_case: Optional[Dict[str, Any]] = None
    min_eps: Optional[Dict[str, Any]] = None
    diagnostics: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    timing: Dict[str, Any] = field(default_factory=dict)
    plots: List[str] = field(default_factory=list)

    def accuracy(self, attack: str, eps: float) -> float:
        """Robust accuracy under ``attack`` at a grid ``eps``."""
        if attack not in self.attacks:
            raise KeyError(f"no attack {attack!r} in this report; it has {sorted(self.attacks)}")
        for e, a in zip(self.eps, self.attacks[attack]["accuracy"]):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
                return a
        raise KeyError(f"eps {eps!r} is not on this report's grid {self.eps}")

    def margin(self, attack: Optional[str] = None) -> Dict[str, Any]:
        """The robustness margin under ``attack``, or under the worst case over all attacks (None)."""
        if attack is None:
            return (self.worst_case or next(iter(self.attacks.values())))["margin"]
        return self.attacks[attack]["margin"]

    def to_dict(self) -> Dict[str, Any]:
        """A dict of plain types, strict-JSON ready: non-finite floats (e.g. the inf of a never-fooled
        sample's minimal ε) become the strings "inf", "-inf", "nan"."""
        return {f.name: encode(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        names = {f.name for f in fields(cls)}
        missing = {"config", "n_samples", "clean_accuracy", "eps", "attacks"} - d.keys()
        if missing:
            raise ValueError(f"not an evaluation report: missing {sorted(missing)}")
        config = {k: (decode(v) if k in _CONFIG_NUMBERS else v) for k, v in d["config"].items()}
        rest = {k: (v if k in _TEXT else decode(v)) for k, v in d.items() if k in names and k != "config"}
        return cls(config=config, **rest)

    def to_json(self, path: PathLike, indent: int = 2) -> Path:
        return write_json(path, self.to_dict(), indent)

    @classmethod
    def from_json(cls, path: PathLike) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A text table: robust accuracy per attack and ε, margins, minimal ε, warnings."""
        width = max([len(n) for n in self.attacks] + [10])
        lines = [f"{self.config.get('model', {}).get('name', 'model')} on {self.n_samples} samples of "
                 f"{self.config.get('data', {}).get('name', 'data')}: clean accuracy {self.clean_accuracy:.2%}",
                 f"{'eps (' + norm_label(self.config.get('norm', 'linf')) + ')':<{width}} " + " ".join(f"{e:>8.4g}" for e in self.eps) + "   margin"]
        rows = list(self.attacks.items()) + ([("worst case", self.worst_case)] if self.worst_case else [])
        for name, r in rows:
            m = r["margin"]
            margin = "-" if m["interpolated"] is None else f"{'>=' if m['lower_bound'] else ''}{m['interpolated']:.4g}"
            lines.append(f"{name:<{width}} " + " ".join(f"{a:>8.2%}" for a in r["accuracy"]) + f"   {margin}")
        if self.min_eps:
            me = self.min_eps
            lines.append(f"minimal fooling eps ({me['attack']['name']}, up to {me['eps_max']:.4g}, tol {me['tol']:.2g}) "
                         f"of the {me['n_correct']} correct samples: median {_num(me['median'])}, mean over the fooled "
                         f"{_num(me['mean_fooled'])}, fooled {_num(me['fooled_fraction'], '.1%')}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
