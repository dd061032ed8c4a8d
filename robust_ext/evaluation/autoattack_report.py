"""The result of :func:`~robust_ext.evaluation.autoattack`: plain numbers, JSON in and out, a text summary and
a RobustBench-style entry."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._io import write_json
from .._json import decode, encode
from ..attacks.threats import norm_label
from .report import PathLike

_NOT_SAVED = ("x_adv",)
_ROBUSTBENCH_NORMS = {"linf": "Linf", "l2": "L2"}


@dataclass
class AutoAttackReport:
    """What an AutoAttack evaluation measured.

    config: the model, data, version, attacks with their settings, norm, ε grid, bounds, seed, batch size,
        amp, the number of processes and the library versions.
    clean_accuracy: accuracy on the unperturbed points; eps: the grid; attacks: the attacks' names in the
        order they ran.
    results: one dict per ε: ``robust_accuracy`` (after every attack), ``accuracy_after`` (``clean``, then
        each attack: the accuracy once it ran: non-increasing), ``attacked`` (points each attack ran on: those
        still robust before it; for an attack gated to the flagged points, those of them the checks flag),
        ``fooled`` (points each attack fooled: it only ever attacks points no earlier attack fooled), ``outside_ball`` (points an attack returned outside the
        ε-ball or the bounds: not counted as fooled) and ``per_class`` (``n`` points per class, then per class
        the accuracy clean and after each attack; None for a class without points).
    fooled_by: per ε, per point: None (robust), ``"clean"`` (misclassified without attack) or the name of the
        attack that fooled it.
    checks: the original's sanity checks (:mod:`.autoattack_checks`); warnings: what they and the run found
        (also issued as :class:`~robust_ext.evaluation.EvaluationWarning`); unreliable: "this evaluation may
        be unreliable" when a check fired, else None.
    x_adv: per ε, the points as the attack that fooled them left them (the clean image otherwise); on the
        main process only, not saved to JSON.
    """

    config: Dict[str, Any]
    n_samples: int
    clean_accuracy: float
    eps: List[float]
    attacks: List[str]
    results: List[Dict[str, Any]]
    fooled_by: List[List[Optional[str]]]
    checks: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    unreliable: Optional[str] = None
    timing: Dict[str, Any] = field(default_factory=dict)
    x_adv: Optional[Dict[float, Any]] = field(default=None, repr=False, compare=False)

    def _index(self, eps: Optional[float]) -> int:
        if eps is None:
            return len(self.eps) - 1
        for j, e in enumerate(self.eps):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
                return j
        raise KeyError(f"eps {eps!r} is not on this report's grid {self.eps}")

    def robust_accuracy(self, eps: Optional[float] = None) -> float:
        """The accuracy left after the whole ensemble at ``eps`` (default: the largest ε)."""
        return self.results[self._index(eps)]["robust_accuracy"]

    def robustbench(self, eps: Optional[float] = None) -> Dict[str, Any]:
        """A RobustBench-style entry at ``eps`` (default: the largest ε): accuracies in percent with two
        decimals, as RobustBench's model cards write them."""
        j = self._index(eps)
        norm = self.config.get("norm", "linf")
        return {"dataset": self.config.get("data", {}).get("name"), "threat_model": _ROBUSTBENCH_NORMS.get(norm, norm),
                "norm": norm, "eps": self.eps[j], "n_points": self.n_samples,
                "clean_acc": f"{100 * self.clean_accuracy:.2f}",
                "autoattack_acc": f"{100 * self.results[j]['robust_accuracy']:.2f}",
                "version": self.config.get("version"), "unreliable": self.unreliable}

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: encode(getattr(self, f.name)) for f in fields(self) if f.name not in _NOT_SAVED}
        d["robustbench"] = self.robustbench()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AutoAttackReport":
        names = {f.name for f in fields(cls)} - set(_NOT_SAVED)
        missing = {"config", "n_samples", "clean_accuracy", "eps", "attacks", "results", "fooled_by"} - d.keys()
        if missing:
            raise ValueError(f"not an AutoAttack report: missing {sorted(missing)}")
        text = ("warnings", "unreliable", "fooled_by", "attacks", "config")
        return cls(**{k: (v if k in text else decode(v)) for k, v in d.items() if k in names})

    def to_json(self, path: PathLike, indent: int = 2) -> Path:
        return write_json(path, self.to_dict(), indent)

    @classmethod
    def from_json(cls, path: PathLike) -> "AutoAttackReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A text table: accuracy after each attack per ε, the checks' warnings."""
        c = self.config
        width = max([len(a) for a in self.attacks] + [12])
        lines = [f"AutoAttack ({c.get('version')}) of {c.get('model', {}).get('name', 'model')} on {self.n_samples} "
                 f"points of {c.get('data', {}).get('name', 'data')}: clean accuracy {self.clean_accuracy:.2%}",
                 f"{'eps (' + norm_label(c.get('norm', 'linf')) + ')':<{width}} "
                 + " ".join(f"{e:>8.4g}" for e in self.eps)]
        for name in self.attacks:
            lines.append(f"{'after ' + name:<{width}} "
                         + " ".join(f"{r['accuracy_after'][name]:>8.2%}" for r in self.results))
        lines.append(f"{'robust':<{width}} " + " ".join(f"{r['robust_accuracy']:>8.2%}" for r in self.results))
        for k, a in enumerate(c.get("attacks", [])):
            if a.get("gate"):
                ran = ", ".join(str(r.get("attacked", {}).get(a["name"], "?")) for r in self.results)
                where = "only on the points the checks flag"
                if a["gate"] == "escalate" and k:
                    where = f"on the points the checks flag, or on all when {c['attacks'][k - 1]['name']} fooled any"
                lines.append(f"{a['name']} ran {where}: {ran} point(s)")
        if self.unreliable:
            lines.append(f"{self.unreliable}:")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
