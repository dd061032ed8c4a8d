"""The fused layers against ATen's ops, forward and backward: ReLU + 2x2 max-pool
(``robust_ext.pooling.relu_max_pool2d`` vs ``F.max_pool2d(F.relu(x), 2)``) and inference-mode BatchNorm +
ReLU (``robust_ext.batchnorm.bn_relu(bn, x)`` vs ``F.relu(bn(x))``, the layer in eval mode with non-trivial
running statistics, its weight and bias requiring grad as in a model).

    python benchmarks/bench_layers.py                     # ~1-2 min on 2 cores
    python benchmarks/bench_layers.py --layers pool --threads 2 --pool-shapes 128x64x28x28

For each layer, shape, dtype (fp32, bf16), layout (NCHW, channels_last) and thread count (1, all):
milliseconds of (a) the forward alone (no autograd graph), (b) forward + backward through autograd with a
given output gradient, the input gradient only (``torch.autograd.grad``, as an attack asks). Fastest of
``--repeats`` rounds; the two implementations run alternately so that background load hits both alike.
Default shapes: the small CNN's pool input at batch 128 (128x64x28x28) and a wider one; the
pre-activation ResNet's first- and last-stage BatchNorm inputs at batch 128 (128x16x32x32, 128x128x4x4).
The ratio aten/fused is the speed-up; it is informational (no target): the end-to-end effect is in
bench_attack.py / bench_train.py.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import robust_ext
from robust_ext.batchnorm import bn_relu
from robust_ext.pooling import relu_max_pool2d
from robust_ext._io import write_json
from _common import cpu_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _eval_bn(channels):
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


# layer -> (implementations for a given input shape, output shape)
LAYERS = {
    "pool": (lambda shape: {"fused": relu_max_pool2d, "aten": lambda x: F.max_pool2d(F.relu(x), 2)},
             lambda s: (s[0], s[1], s[2] // 2, s[3] // 2)),
    "bn_relu": (lambda shape: (lambda bn: {"fused": lambda x: bn_relu(bn, x), "aten": lambda x: F.relu(bn(x))})(
                    _eval_bn(shape[1])),
                lambda s: s),
}


def timed(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(layer, shape, dtype, channels_last, repeats, inner):
    impls_for, out_shape = LAYERS[layer]
    impls = impls_for(shape)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(out_shape(shape), generator=g).to(dtype)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)

    def forward(fn):
        with torch.no_grad():
            fn(x)

    def forward_backward(fn):
        torch.autograd.grad(fn(x), x, grad)

    best = {}
    for name, fn in impls.items():  # warm-up
        forward(fn)
        forward_backward(fn)
    for _ in range(repeats):
        for name, fn in impls.items():
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
    p.add_argument("--layers", default="pool,bn_relu", help="comma-separated, of pool,bn_relu")
    p.add_argument("--pool-shapes", default="128x64x28x28,256x32x32x32", help="comma-separated NxCxHxW")
    p.add_argument("--bn-shapes", default="128x16x32x32,128x128x4x4", help="comma-separated NxCxHxW")
    p.add_argument("--threads", type=int, nargs="*", default=sorted({1, os.cpu_count()}))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=5, help="calls per timed round")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_layers.json"))
    args = p.parse_args(argv)
    args.layers = [v for v in args.layers.split(",") if v]
    if not args.layers or set(args.layers) - set(LAYERS):
        p.error(f"--layers: expected a comma-separated subset of {','.join(LAYERS)}, got {','.join(args.layers)!r}")
    args.shapes = {}
    for layer, flag in (("pool", "pool_shapes"), ("bn_relu", "bn_shapes")):
        text = getattr(args, flag)
        try:
            shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
        except ValueError:
            p.error(f"--{flag.replace('_', '-')}: expected NxCxHxW, got {text!r}")
        if not shapes or any(len(s) != 4 or min(s) < 1 or s[2] < 2 or s[3] < 2 for s in shapes):
            p.error(f"--{flag.replace('_', '-')}: each shape must be NxCxHxW with H, W >= 2")
        args.shapes[layer] = shapes
    if min(args.threads, default=0) < 1:
        p.error("--threads: each value must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if robust_ext.backend()["cpu"] != "extension":
        raise SystemExit(f"the fused layers need the extension ({robust_ext.backend()['reason']})")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv), "torch": torch.__version__,
            "python": platform.python_version(), "build_info": robust_ext.build_info(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "repeats": args.repeats, "inner": args.inner,
            "loadavg_start": os.getloadavg()}
    print(f"torch {meta['torch']} | {meta['cpu_model']} ({meta['cpu_count']} cpus) | load {meta['loadavg_start'][0]:.2f}")
    print(f"\n{'layer':<9}{'shape':<16}{'dtype':<6}{'layout':<15}{'thr':>4}{'fused fwd':>11}{'aten fwd':>10}{'x':>6}"
          f"{'fused f+b':>11}{'aten f+b':>10}{'x':>6}")
    results = []
    cases = [(layer, shape) for layer in args.layers for shape in args.shapes[layer]]
    for (layer, shape), (dname, dtype), cl, threads in itertools.product(cases, DTYPES.items(), (False, True),
                                                                          args.threads):
        torch.set_num_threads(threads)
        row = measure(layer, shape, dtype, cl, args.repeats, args.inner)
        row.update(layer=layer, shape=list(shape), dtype=dname, layout="channels_last" if cl else "nchw",
                   threads=threads)
        results.append(row)
        print(f"{layer:<9}{'x'.join(map(str, shape)):<16}{dname:<6}{row['layout']:<15}{threads:>4}"
              f"{row['fused.forward_ms']:>11.2f}{row['aten.forward_ms']:>10.2f}{row['speedup_forward']:>6.1f}"
              f"{row['fused.fwd_bwd_ms']:>11.2f}{row['aten.fwd_bwd_ms']:>10.2f}{row['speedup_fwd_bwd']:>6.1f}")
    meta["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"meta": meta, "results": results})
    print(f"\n(ms, fastest of {args.repeats} rounds; x = aten / fused)\nwrote {out}")


if __name__ == "__main__":
    main()
