"""A user's own model: PGD on a plain CNN and a plain pre-activation ResNet, as written (nn.ReLU, nn.MaxPool2d,
nn.BatchNorm2d) and through ``robust_ext.fuse``, against torchattacks.PGD on the model as written.

    python benchmarks/bench_fuse.py               # ~3 minutes on 2 quiet cores
    python benchmarks/bench_fuse.py --quick       # smoke run

Rows per model (same batch, same PGD, configurations interleaved round-robin, median of ``--repeats`` calls
after a warm-up): ``torchattacks.fp32`` (the baseline, on the model as written), ``ours.fp32`` and
``ours.bf16_cl`` (``amp=True``, model and images channels_last) on the model as written, and the same on
``fuse(model)`` (``fused.fp32``, ``fused.bf16_cl``). Robust accuracy (fp32 model) of every row beside.
Targets (the plain CNN): fused + bf16 + channels_last >= 2x torchattacks' fp32; fused fp32 >= 1.15x.
Run under tcmalloc for clean fp32 rows (docs/performance_tips.md). Writes JSON; a MISS is reported, never raised.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robust_ext.attacks import pgd
from robust_ext.data import load_dataset
from robust_ext.fuse import fuse


def plain_cnn() -> nn.Module:
    """The MATLAB example's CNN as a user writes it."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + short


class PlainPreActResNet(nn.Module):
    """A pre-activation ResNet-10 (width 16) as a user writes it, for 3x32x32 images."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        chans = [width, 2 * width, 4 * width, 8 * width]
        blocks, cin = [], width
        for i, c in enumerate(chans):
            blocks.append(PreActBlock(cin, c, 1 if i == 0 else 2))
            cin = c
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cnn_setup(batch, seed):
    torch.manual_seed(seed)
    model = plain_cnn()
    ds = load_dataset("mnist5k", split="train", seed=seed)
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(0, len(x), 128):  # one epoch: a model whose attack has work to do
        loss = F.cross_entropy(model(x[i:i + 128]), y[i:i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = load_dataset("mnist5k", split="test", seed=seed)
    return model.eval(), test.tensors[0][:batch], test.tensors[1][:batch], 0.2, 0.02


def resnet_setup(batch, seed):
    torch.manual_seed(seed)
    model = PlainPreActResNet()
    with torch.no_grad():  # BatchNorm statistics of random images, then random labels = its own predictions
        model.train()
        for _ in range(5):
            model(torch.rand(64, 3, 32, 32))
    model.eval()
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, 1 / 255, 0.25 / 255


MODELS = {"cnn": cnn_setup, "resnet": resnet_setup}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="cnn,resnet")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench_fuse.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.batch = 3, 1, 64
    torch.set_num_threads(args.threads)
    import torchattacks

    results = {"config": vars(args), "torch": torch.__version__, "models": {}}
    for name in args.models.split(","):
        model, x, y, eps, alpha = MODELS[name](args.batch, args.seed)
        fused, report = fuse(model, return_report=True)
        cl = lambda m: m.to(memory_format=torch.channels_last)  # noqa: E731 (shares parameters: same tensors)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
        kw = dict(eps=eps, alpha=alpha, steps=args.steps)
        rows = {
            "torchattacks.fp32": lambda: torchattacks.PGD(model, random_start=True, **kw)(x, y),
            "ours.fp32": lambda: pgd(model, x, y, generator=gen(), **kw),
            "fused.fp32": lambda: pgd(fused, x, y, generator=gen(), **kw),
            "ours.bf16_cl": lambda: pgd(model, x_cl, y, amp=True, generator=gen(), **kw),
            "fused.bf16_cl": lambda: pgd(fused, x_cl, y, amp=True, generator=gen(), **kw),
        }
        times = {k: [] for k in rows}
        outs = {}
        for k, fn in rows.items():  # warm-up
            if k.endswith("_cl"):
                cl(model)
            fn()
        for _ in range(args.repeats):
            for k, fn in rows.items():
                (cl if k.endswith("_cl") else (lambda m: m.to(memory_format=torch.contiguous_format)))(model)
                t0 = time.perf_counter()
                outs[k] = fn()
                times[k].append(time.perf_counter() - t0)
        model.to(memory_format=torch.contiguous_format)
        base = statistics.median(times["torchattacks.fp32"])
        table = {}
        for k in rows:
            med = statistics.median(times[k])
            with torch.no_grad():
                acc = (model(outs[k]).argmax(1) == y).float().mean().item()
            table[k] = {"median_s": med, "times_s": times[k], "speedup_vs_torchattacks_fp32": base / med,
                        "images_per_s": x.shape[0] / med, "robust_acc": acc}
        results["models"][name] = {"rows": table, "fused": report.fused, "left_unfused": report.left,
                                   "eps": eps, "alpha": alpha}
        print(f"\n{name}: PGD-{args.steps}, batch {x.shape[0]}, {args.threads} threads; fused {len(report.fused)} "
              f"pattern(s)")
        for k, r in table.items():
            print(f"  {k:<20}{r['median_s'] * 1e3:>9.1f} ms{r['speedup_vs_torchattacks_fp32']:>7.2f}x"
                  f"{r['robust_acc']:>9.3f} robust acc")
    cnn = results["models"].get("cnn")
    if cnn:
        rows = cnn["rows"]
        results["targets"] = {
            "cnn fused bf16_cl >= 2x torchattacks fp32": rows["fused.bf16_cl"]["speedup_vs_torchattacks_fp32"] >= 2,
            "cnn fused fp32 >= 1.15x torchattacks fp32": rows["fused.fp32"]["speedup_vs_torchattacks_fp32"] >= 1.15}
        for t, ok in results["targets"].items():
            print(f"target {t}: {'met' if ok else 'MISS'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
