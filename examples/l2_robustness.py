"""An MNIST L2 robustness curve: a standard CNN and an L2 PGD-trained CNN (Madry et al. 2018) on the 5,000
real digits, each evaluated under L2 PGD-20 and APGD-CE (100 steps) on 500 test digits over an eps grid, in
float32.

    python examples/l2_robustness.py --out l2_out        # ~10 minutes on 2 CPU cores

Writes ``l2_out/l2_robustness.json`` (every accuracy), ``l2_out/accuracy_vs_eps_l2.png`` and the two
models' checkpoints; prints the table the README shows.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robust_ext.data import load_dataset
from robust_ext.evaluation import evaluate, make_attack
from robust_ext.evaluation.plots import plot_accuracy_curves
from robust_ext.models import SmallCNN
from robust_ext.training import train

GRID = (0.5, 1.0, 1.5, 2.0, 3.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="l2_out")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-eps", type=float, default=2.0, help="L2 radius of the PGD training attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=500, help="test digits to evaluate")
    args = p.parse_args(argv)
    out = Path(args.out)
    train_set = load_dataset("mnist5k", split="train", seed=args.seed)
    test_set = load_dataset("mnist5k", split="test", seed=args.seed)
    test_set = torch.utils.data.TensorDataset(*(t[:args.n_test] for t in test_set.tensors))
    attacks = [make_attack("pgd", steps=20), make_attack("apgd")]
    rows, reports = {}, {}
    for name, method in (("standard", "standard"), ("l2_pgd", "pgd")):
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        model = SmallCNN()
        train(model, train_set, test_set, method=method, norm="l2", eps=args.train_eps if method == "pgd" else None,
              eval_eps=args.train_eps, epochs=args.epochs, seed=args.seed,
              out_dir=out / name, progress=False, plot=False)
        trained = time.perf_counter() - t
        report = evaluate(model.eval(), test_set, attacks, eps=list(GRID), norm="l2", min_eps=False, seed=args.seed,
                          progress=False, model_name=f"{name} CNN", data_name="mnist5k test")
        report.to_json(out / f"{name}_report.json")
        reports[name] = report
        rows[name] = {"clean": report.clean_accuracy, "train_s": round(trained, 1),
                      "evaluate_s": round(time.perf_counter() - t - trained, 1),
                      **{a: report.attacks[a]["accuracy"] for a in report.attacks},
                      "worst_case": report.worst_case["accuracy"]}
    (out / "l2_robustness.json").write_text(json.dumps({"eps": list(GRID), "train_eps": args.train_eps,
                                                         "epochs": args.epochs, "models": rows}, indent=2))
    plot_accuracy_curves(reports, out / "accuracy_vs_eps_l2.png",
                         title="MNIST (5,000 digits): standard vs L2 PGD-trained CNN, L2 attacks")
    print(f"{'model':<10}{'clean':>8} " + "".join(f"{'eps ' + format(e, 'g'):>10}" for e in GRID) + "   (worst case of PGD-20 and APGD-CE)")
    for name, r in rows.items():
        print(f"{name:<10}{r['clean']:>8.1%} " + "".join(f"{a:>10.1%}" for a in r["worst_case"]))


if __name__ == "__main__":
    main()
