"""The fused ReLU + 2x2 max-pool layer against ATen's ReLU then max_pool2d, forward and backward.

    python benchmarks/bench_pool.py            # ~1 min on 2 cores
    python benchmarks/bench_pool.py --threads 2 --shapes 128x64x28x28

For each shape, dtype (fp32, bf16), layout (NCHW, channels_last) and thread count (1, all): milliseconds of
(a) the forward alone (no autograd graph), (b) forward + backward through autograd with a given output
gradient; fused = ``robust_ext.pooling.relu_max_pool2d``, aten = ``F.max_pool2d(F.relu(x), 2)``. Fastest of
``--repeats`` rounds; the two implementations run alternately so that background load hits both alike.
The default shape is the small CNN's pool input at batch 128 (128x64x28x28). The ratio aten/fused is the
speed-up; it is informational (no target): the end-to-end effect is in bench_attack.py / bench_train.py.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import robust_ext
from robust_ext.pooling import relu_max_pool2d
from _common import cpu_model

IMPLS = {"fused": relu_max_pool2d, "aten": lambda x: F.max_pool2d(F.relu(x), 2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(shape, dtype, channels_last, repeats, inner):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g).to(dtype)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)

    def forward(fn):
        with torch.no_grad():
            fn(x)

    def forward_backward(fn):
        x.grad = None
        fn(x).backward(grad)

    best = {}
    for name, fn in IMPLS.items():  # warm-up
        forward(fn)
        forward_backward(fn)
    for _ in range(repeats):
        for name, fn in IMPLS.items():
            for what, run in (("forward_ms", forward), ("fwd_bwd_ms", forward_backward)):
                t = timed(lambda: run(fn), inner) * 1e3
                key = (name, what)
                best[key] = min(best.get(key, t), t)
    row = {f"{name}.{what}": best[(name, what)] for name, what in best}
    row["speedup_forward"] = row["aten.forward_ms"] / row["fused.forward_ms"]
    row["speedup_fwd_bwd"] = row["aten.fwd_bwd_ms"] / row["fused.fwd_bwd_ms"]
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="128x64x28x28,256x32x32x32", help="comma-separated NxCxHxW")
    p.add_argument("--threads", type=int, nargs="*", default=sorted({1, os.cpu_count()}))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=5, help="calls per timed round")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_pool.json"))
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        p.error(f"--shapes: expected NxCxHxW, got {args.shapes!r}")
    if any(len(s) != 4 or min(s) < 1 or s[2] < 2 or s[3] < 2 for s in args.shapes):
        p.error("--shapes: each shape must be NxCxHxW with H, W >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    if robust_ext.backend()["cpu"] != "extension":
        raise SystemExit(f"the fused layer needs the extension ({robust_ext.backend()['reason']})")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv), "torch": torch.__version__,
            "python": platform.python_version(), "build_info": robust_ext.build_info(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "repeats": args.repeats, "inner": args.inner,
            "loadavg_start": os.getloadavg()}
    print(f"torch {meta['torch']} | {meta['cpu_model']} ({meta['cpu_count']} cpus) | load {meta['loadavg_start'][0]:.2f}")
    print(f"\n{'shape':<16}{'dtype':<6}{'layout':<15}{'thr':>4}{'fused fwd':>11}{'aten fwd':>10}{'x':>6}"
          f"{'fused f+b':>11}{'aten f+b':>10}{'x':>6}")
    results = []
    for shape, (dname, dtype), cl, threads in itertools.product(args.shapes, DTYPES.items(), (False, True),
                                                                 args.threads):
        torch.set_num_threads(threads)
        row = measure(shape, dtype, cl, args.repeats, args.inner)
        row.update(shape=list(shape), dtype=dname, layout="channels_last" if cl else "nchw", threads=threads)
        results.append(row)
        print(f"{'x'.join(map(str, shape)):<16}{dname:<6}{row['layout']:<15}{threads:>4}"
              f"{row['fused.forward_ms']:>11.2f}{row['aten.forward_ms']:>10.2f}{row['speedup_forward']:>6.1f}"
              f"{row['fused.fwd_bwd_ms']:>11.2f}{row['aten.fwd_bwd_ms']:>10.2f}{row['speedup_fwd_bwd']:>6.1f}")
    meta["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\n(ms, fastest of {args.repeats} rounds; x = aten / fused)\nwrote {out}")


if __name__ == "__main__":
    main()
