"""AutoAttack, robust_ext against torchattacks: robust accuracy, time and passes per point, attack by attack.

    python benchmarks/bench_eval.py                     # 3 models x (L-inf, L2), 200 points each (~1-2 h on 2 cores)
    python benchmarks/bench_eval.py --quick             # 1 model, L-inf, 16 points, short attacks: a smoke run

Models, trained by this script (seeded; cached in ``--cache``): the demo's standard and FGSM-RS ``SmallCNN``
on mnist5k (10 epochs each), and a ``SmallCNN`` PGD-trained on full Fashion-MNIST (eps 0.1, 3 steps, 2 epochs). On each model and norm, on
the same test points, side by side:

* ``torchattacks``: its components built with the original's ``standard`` settings (APGD-CE and APGD-T with
  ``steps=100``, FAB multi-targeted with ``steps=100``, Square with 5,000 queries, one restart each; its own
  ``AutoAttack`` class would run 10 steps, its issue #196; Square with ``resc_schedule=False``, as the
  original's ensemble builds it), each attack run on the points still robust, as
  its ``MultiAttack`` does.
* ``standard`` (fp32; bf16 autocast where the CPU runs bf16 natively) and ``fast`` from
  :func:`robust_ext.evaluation.autoattack`.

Per attack: seconds, images/s (points attacked per second), forward and backward passes per attacked point
(rows of the model's input counted by a wrapper), and the robust accuracy after it. The targets of the
issue are checked at the end and written with everything else to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, malloc_in_use  # noqa: E402

from robust_ext.attacks.checks import cpu_runs_bf16_natively  # noqa: E402
from robust_ext.attacks.threats import get_threat  # noqa: E402
from robust_ext.data import load_dataset  # noqa: E402
from robust_ext.evaluation import autoattack  # noqa: E402
from robust_ext.models import SmallCNN  # noqa: E402
from robust_ext.training import TrainConfig, train  # noqa: E402

# name -> (data set, training method, training eps, epochs, PGD steps)
MODELS = {"mnist_standard": ("mnist5k", "standard", None, 10, None),
          "mnist_fgsm_rs": ("mnist5k", "fgsm_rs", 0.1, 10, None),
          "fashion_pgd": ("fashion-mnist", "pgd", 0.1, 2, 3)}
EPS = {"linf": {"mnist5k": 0.1, "fashion-mnist": 0.1}, "l2": {"mnist5k": 1.5, "fashion-mnist": 1.0}}
PEER = ("apgd-ce", "apgd-t", "fab-t", "square")


class Counter(nn.Module):
    """``model`` counting the rows of every forward pass and of every backward pass through its output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.fwd, self.bwd = model, 0, 0

    def forward(self, x):
        out = self.model(x)
        self.fwd += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, g):
        self.bwd += g.shape[0]

    def reset(self):
        self.fwd = self.bwd = 0


def trained_model(name: str, cache: Path, seed: int, quick: bool) -> nn.Module:
    data, method, eps, epochs, pgd_steps = MODELS[name]
    path = cache / f"{name}{'_quick' if quick else ''}_s{seed}.pt"
    torch.manual_seed(seed)
    model = SmallCNN()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train_set = load_dataset(data, split="train")
    if quick:
        train_set, epochs = torch.utils.data.Subset(train_set, range(1000)), 1
    t = time.perf_counter()
    train(model, train_set, None, TrainConfig(method=method, eps=eps, epochs=epochs, batch_size=128, lr=1e-3,
                                              optimizer="adam", seed=seed, progress=False, plot=False,
                                              **({"pgd_steps": pgd_steps} if pgd_steps else {})))
    print(f"trained {name} in {time.perf_counter() - t:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def test_points(data: str, n: int, model) -> tuple:
    ds = load_dataset(data, split="test")
    x, y = ds.tensors if hasattr(ds, "tensors") else (torch.stack([ds[i][0] for i in range(len(ds))]),
                                                       torch.tensor([ds[i][1] for i in range(len(ds))]))
    return x[:n].contiguous(), y[:n].long()


def peer_attacks(model, norm: str, eps: float, steps: int, queries: int):
    import torchattacks as ta

    n = "Linf" if norm == "linf" else "L2"
    return {"apgd-ce": ta.APGD(model, norm=n, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0),
            "apgd-t": ta.APGDT(model, norm=n, eps=eps, steps=steps, n_restarts=1, n_classes=10, seed=0),
            "fab-t": ta.FAB(model, norm=n, eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10,
                            seed=0),
            # resc_schedule=False: AutoAttack's Square (torchattacks' own AutoAttack keeps the class default True)
            "square": ta.Square(model, norm=n, eps=eps, n_queries=queries, n_restarts=1, p_init=0.8,
                                resc_schedule=False, seed=0)}


def run_peer(counter: Counter, x, y, norm, eps, steps, queries, batch) -> dict:
    """torchattacks' components in AutoAttack's order, each on the points still robust (its MultiAttack)."""
    with torch.no_grad():
        robust = counter.model(x).argmax(1) == y
    rows, after = {}, {"clean": float(robust.float().mean())}
    for name, atk in peer_attacks(counter, norm, eps, steps, queries).items():
        idx = robust.nonzero().squeeze(1)
        counter.reset()
        t = time.perf_counter()
        for part in idx.split(batch):
            if part.numel() == 0:
                continue
            adv = atk(x[part], y[part])
            dist = get_threat(norm).distance(adv, x[part])
            with torch.no_grad():
                fooled = (counter.model(adv).argmax(1) != y[part]) & (dist <= eps * (1 + 1e-5) + 1e-6)
            robust[part[fooled]] = False
        rows[name] = _row(time.perf_counter() - t, idx.numel(), counter)
        after[name] = float(robust.float().mean())
    return {"attacks": rows, "accuracy_after": after, "robust_accuracy": after[PEER[-1]],
            "total_s": sum(r["seconds"] for r in rows.values())}


def _row(seconds, attacked, counter) -> dict:
    return {"seconds": seconds, "attacked": attacked, "images_per_s": attacked / seconds if seconds else None,
            "forward_per_point": counter.fwd / attacked if attacked else 0.0,
            "backward_per_point": counter.bwd / attacked if attacked else 0.0}


def run_ours(counter: Counter, x, y, norm, eps, version, amp, steps, queries, batch, seed) -> dict:
    """One :func:`autoattack` run of ``version``; each attack's calls go through ``counter`` to count its passes
    (the report times each attack)."""
    from dataclasses import replace

    from robust_ext.evaluation import autoattack_versions as V
    from robust_ext.evaluation.specs import make_attack

    version_name, specs = V.resolve_ensemble(version, None, amp)
    counts = {s.name: [0, 0, 0] for s in specs}

    def counted(spec):
        if steps != 100 or queries != 5000:  # --quick: the same list with shorter attacks
            short = {"n_queries": queries} if "n_queries" in spec.params else {"steps": steps}
            spec = replace(make_attack(spec.kind, name=spec.name, **{**spec.params, **short}), gate=spec.gate)

        def run(model, xx, yy, e, nrm, lo, hi, gen, rebind):
            counter.reset()
            adv = spec.run(model, xx, yy, e, nrm, lo, hi, gen, rebind)
            c = counts[spec.name]
            c[0], c[1], c[2] = c[0] + counter.fwd, c[1] + counter.bwd, c[2] + xx.shape[0]
            return adv
        return replace(spec, run=run)

    t = time.perf_counter()
    report = autoattack(counter, (x, y), eps=eps, norm=norm, version="custom", attacks=[counted(s) for s in specs],
                        batch_size=batch, seed=seed, progress=False, return_adversarial=False)
    total = time.perf_counter() - t
    rows = {}
    for name, (fwd, bwd, attacked) in counts.items():
        sec = report.timing["attacks_s"][name]
        rows[name] = {"seconds": sec, "attacked": attacked,
                      "images_per_s": attacked / sec if sec and attacked else None,
                      "forward_per_point": fwd / attacked if attacked else 0.0,
                      "backward_per_point": bwd / attacked if attacked else 0.0}
    res = report.results[0]
    return {"version": version_name, "amp": str(amp), "attacks": rows, "accuracy_after": res["accuracy_after"],
            "robust_accuracy": res["robust_accuracy"], "total_s": total, "clean_s": report.timing["clean_s"],
            "warnings": report.warnings}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 model, L-inf, 16 points, 10 steps, 200 queries")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--norms", default="linf,l2")
    p.add_argument("--n", type=int, default=200, help="test points per model")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="the standard bf16 row: auto runs it only where the CPU has native bf16 convolutions")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of torchattacks,standard.fp32,fast.fp32,standard.bf16 (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="benchmarks/results/models")
    p.add_argument("--out", default="benchmarks/results/bench_eval.json")
    args = p.parse_args(argv)
    steps, queries = 100, 5000
    if args.quick:
        args.models, args.norms, args.n, steps, queries = "mnist_standard", "linf", 16, 10, 200
    torch.set_num_threads(args.threads)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_runs_bf16_natively())
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "malloc": malloc_in_use(), "loadavg_start": list(os.getloadavg()),
            "argv": sys.argv[1:] if argv is None else list(argv), "native_bf16": cpu_runs_bf16_natively()}
    results = {"meta": meta, "config": {**vars(args), "steps": steps, "queries": queries, "bf16_row": bf16},
               "runs": []}
    out = Path(args.out)
    for name in args.models.split(","):
        model = trained_model(name, Path(args.cache), args.seed, args.quick)
        data = MODELS[name][0]
        x, y = test_points(data, args.n, model)
        counter = Counter(model).eval()
        for norm in args.norms.split(","):
            eps = EPS[norm][data]
            run = {"model": name, "data": data, "norm": norm, "eps": eps, "n": len(y), "rows": {}}
            print(f"\n{name} ({data}), {norm} eps={eps:g}, {len(y)} points", flush=True)
            contenders = [("torchattacks", lambda: run_peer(counter, x.clone(), y, norm, eps, steps, queries,
                                                            args.batch)),
                          ("standard.fp32", lambda: run_ours(counter, x, y, norm, eps, "standard", False, steps,
                                                             queries, args.batch, args.seed)),
                          ("fast.fp32", lambda: run_ours(counter, x, y, norm, eps, "fast", False, steps, queries,
                                                         args.batch, args.seed))]
            if bf16:
                contenders.append(("standard.bf16", lambda: run_ours(counter, x, y, norm, eps, "standard", True,
                                                                     steps, queries, args.batch, args.seed)))
            if args.rows:
                contenders = [c for c in contenders if c[0] in args.rows.split(",")]
            for label, fn in contenders:
                r = fn()
                run["rows"][label] = r
                print(f"  {label:<14} robust {r['robust_accuracy']:.2%}  {r['total_s']:8.1f} s  " + "  ".join(
                    f"{k} {v['seconds']:.1f}s/{v['attacked']}pts f{v['forward_per_point']:.0f} "
                    f"b{v['backward_per_point']:.0f}" for k, v in r["attacks"].items()), flush=True)
            add_ratios(run)
            results["runs"].append(run)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    results["targets"] = targets(results["runs"])
    for t, ok in results["targets"].items():
        print(f"target {t}: {ok}")
    meta["loadavg_end"] = list(os.getloadavg())
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def add_ratios(run: dict) -> None:
    """Each robust_ext row against torchattacks' (and fast against standard), where both rows are there."""
    rows, peer = run["rows"], run["rows"].get("torchattacks")
    run["ratios"] = {k: {"speedup_vs_torchattacks": peer["total_s"] / v["total_s"],
                         "robust_minus_torchattacks_pts": 100 * (v["robust_accuracy"] - peer["robust_accuracy"])}
                     for k, v in rows.items() if k != "torchattacks" and peer is not None}
    if "fast.fp32" in run["ratios"] and "standard.fp32" in rows:
        run["ratios"]["fast.fp32"]["fast_minus_standard_pts"] = 100 * (
            rows["fast.fp32"]["robust_accuracy"] - rows["standard.fp32"]["robust_accuracy"])


def targets(runs) -> dict:
    """The issue's targets, per run: met / MISS (with the figure) / not measured."""
    out = {}
    for r in runs:
        key = f"{r['model']} {r['norm']}"
        q = r["ratios"]
        robust_model = MODELS[r["model"]][1] != "standard"
        for label, v in q.items():
            out[f"{key}: {label} robust acc <= torchattacks + 0.2 pt"] = _verdict(
                v["robust_minus_torchattacks_pts"] <= 0.2, f"{v['robust_minus_torchattacks_pts']:+.1f} pt")
        need = 1.1 if robust_model else 1.5
        if "standard.fp32" in q:
            s = q["standard.fp32"]["speedup_vs_torchattacks"]
            out[f"{key}: standard fp32 >= {need}x torchattacks"] = _verdict(s >= need, f"{s:.2f}x")
        f = q.get("fast.fp32", {})
        if "speedup_vs_torchattacks" in f:
            out[f"{key}: fast >= 5x torchattacks standard"] = _verdict(f["speedup_vs_torchattacks"] >= 5,
                                                                       f"{f['speedup_vs_torchattacks']:.2f}x")
        if "fast_minus_standard_pts" in f:
            out[f"{key}: fast within 0.3 pt of standard"] = _verdict(abs(f["fast_minus_standard_pts"]) <= 0.3,
                                                                     f"{f['fast_minus_standard_pts']:+.1f} pt")
        if robust_model:
            b = q.get("standard.bf16")
            out[f"{key}: standard bf16 >= 1.8x torchattacks fp32"] = (
                "not measured: this CPU has no native bf16 convolutions" if b is None else
                _verdict(b["speedup_vs_torchattacks"] >= 1.8, f"{b['speedup_vs_torchattacks']:.2f}x"))
    return out


def _verdict(ok: bool, figure: str) -> str:
    return f"{'met' if ok else 'MISS'} ({figure})"


if __name__ == "__main__":
    main()
