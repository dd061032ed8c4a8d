"""AutoAttack runs for tests/test_autoattack.py that need their own process: one to SIGKILL mid-run, and the
ranks of a torchrun job. Also imported by the tests for the shared case (a small trained MLP on synthetic
10-class images, and a two-attack list).

    python tests/_autoattack_worker.py OUT_DIR [--slow]
    torchrun --nproc_per_node=2 tests/_autoattack_worker.py OUT_DIR
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from robust_ext.evaluation import autoattack, make_attack

N, BATCH, EPS = 96, 8, [0.1, 0.15]


def case(n: int = N, seed: int = 0):
    """(model, x, y): 10 classes of noisy prototypes, an MLP trained on them; a few labels changed."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 6, 6, generator=g)
    y = torch.arange(n) % 10
    x = (protos[y] + 0.35 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)  # the same weights in every process
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    torch.set_num_threads(threads)
    y = y.clone()
    y[::32] = (y[::32] + 1) % 10  # a few points misclassified before any attack
    return model.eval(), x, y


def attacks():
    """Weak APGD-CE first, so that APGD-T has points left to fool."""
    return [make_attack("apgd", name="apgd-ce", steps=2), make_attack("apgd_t", name="apgd-t", steps=4,
                                                                     n_target_classes=3)]


def run(out: Path, slow: bool):
    torch.set_num_threads(1)
    model, x, y = case()
    if slow:  # widen the window in which the test kills this process; hooks change no numbers
        model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    report = autoattack(model, (x, y), eps=EPS, attacks=attacks(), batch_size=BATCH, seed=3, progress=False,
                        state_path=out / "state")
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        report.to_json(out / "report.json")
        torch.save(report.x_adv, out / "x_adv.pt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--slow", action="store_true")
    a = p.parse_args(argv)
    run(a.out, a.slow)


if __name__ == "__main__":
    sys.exit(main())
