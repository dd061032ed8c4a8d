"""``robust-ext``: the command line. ``robust-ext demo`` is the main job; ``robust-ext --help`` lists the rest.

Errors a user can cause (a bad path, an unknown data set or attack, a checkpoint that does not fit the
data) print one line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

from ._io import check_out_dir, run_dir_lock, write_json
from ._json import dumps


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


DESCRIPTION = ("robust-ext: adversarial attacks, robustness evaluation (AutoAttack included) and adversarial "
               "training from the command line. 'robust-ext demo' is the main job; 'robust-ext COMMAND --help' "
               "explains each command.")


class _Formatter(argparse.HelpFormatter):
    """Every option's default shown once: appended where its help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default is not None
                and action.default is not argparse.SUPPRESS and not isinstance(action.default, bool)):
            shown = ",".join(f"{v:g}" for v in action.default) if isinstance(action.default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the same one line as every other usage error (``--help`` shows usage),
    and every option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"robust-ext: error: {message}\n")


def _number(text: str) -> float:
    """A budget as users type it: ``0.03``, ``8/255``; finite and >= 0."""
    from .attacks.checks import MAX_BUDGET

    num, sep, den = text.strip().partition("/")
    try:
        value = float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError, OverflowError):
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_BUDGET):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 such as 0.03 or 8/255, got {text.strip()!r}")
    return value


def _floats(text: str) -> List[float]:
    values = [_number(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _seed(text: str) -> int:
    """A seed torch.Generator.manual_seed takes the same way everywhere: an integer in [0, 2**63)."""
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text.strip()!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text.strip()!r}")
    return value


def _amp(text: str):
    import torch

    from .attacks.checks import cpu_runs_bf16_natively

    # auto: mixed precision where it is faster (a GPU, or a CPU with native bf16 convolutions), else fp32
    choices = {"auto": torch.cuda.is_available() or cpu_runs_bf16_natively(), "off": False, "on": True,
               "bf16": torch.bfloat16, "fp16": torch.float16}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
    return choices[text]


def _finite_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers such as 0.49,0.48,0.45, got {text!r}")
    return values


def _load_data(args, split: Optional[str]):
    """--data (a built-in set, file:PATH or folder:DIR) in its --split, checked against --clip-min/--clip-max;
    -n keeps the first N."""
    import torch

    from .data import load_dataset
    from .own_data import own_source

    name, n = args.data, getattr(args, "n", None)
    if not (math.isfinite(args.clip_min) and math.isfinite(args.clip_max) and args.clip_min < args.clip_max):
        raise UsageError(f"--clip-min must be below --clip-max (both finite), got {args.clip_min} and {args.clip_max}")
    if split is None:  # the default depends on --data: all of your own file, the test split of a built-in set
        split = args.split = "all" if own_source(name) else "test"
    try:
        ds = load_dataset(name, data_dir=args.data_dir, split=split, clip_min=args.clip_min, clip_max=args.clip_max)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(f"--data {name}: {e}") from None
    if n is not None:
        if n < 1:
            raise UsageError(f"-n must be >= 1, got {n}")
        ds = torch.utils.data.TensorDataset(*(t[:n] for t in ds.tensors))
    return ds


def _factory_model(args):
    """--model-factory's model (with --weights if given), normalized by --mean/--std when given."""
    from .checkpoints import load_weights
    from .models import from_factory

    if os.getcwd() not in sys.path:  # a factory of the directory the command runs in, as `python -m` finds it
        sys.path.insert(0, os.getcwd())
    try:
        model = _normalized(from_factory(args.model_factory), args)
    except ValueError as e:
        raise UsageError(f"--model-factory {args.model_factory}: {e}") from None
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise UsageError(f"--weights {args.weights}: no such file")
        try:
            load_weights(model, args.weights)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--weights {args.weights}: {e}") from None
    return model


def _normalized(model, args):
    from .models import Normalized

    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together: give both or neither")
    if args.mean is None:
        return model
    try:
        return Normalized(model, args.mean, args.std)
    except ValueError as e:
        raise UsageError(f"--mean/--std: {e}") from None


def _check_model(model, ds, flag: str):
    """The model takes the data's images and returns floating-point logits for every class its labels hold.
    The probe runs in eval mode (BatchNorm statistics untouched) and leaves the model's mode as it was."""
    import torch

    from .attacks.core import eval_mode
    from .models import Normalized

    x, labels = ds[0][0].unsqueeze(0), ds.tensors[1]
    if isinstance(model, Normalized) and model.mean.numel() not in (1, x.shape[1]):
        raise UsageError(f"--mean/--std: {model.mean.numel()} values, but the images have {x.shape[1]} channel(s)")
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    except Exception as e:  # the architecture refuses these images (channels, size)
        raise UsageError(f"{flag}: the model does not accept this data set's images "
                         f"(shape {list(x.shape[1:])}): {e}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise UsageError(f"{flag}: the model does not return [N, classes] logits (for 1 image: "
                         f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__})")
    if not out.is_floating_point():
        raise UsageError(f"{flag}: the model returns {out.dtype} outputs; the attacks need floating-point logits")
    if out.shape[1] <= int(labels.max()):
        raise UsageError(f"{flag}: the model returns {out.shape[1]} logits, the data's labels go up to "
                         f"{int(labels.max())}")
    return model


def _load_model(args, ds):
    """--model (a checkpoint, or a torch.export .pt2 archive) or --model-factory [--weights], normalized by
    --mean/--std when given, checked against the data, in eval mode (attack and evaluate predict with it)."""
    from .checkpoints import load_exported
    from .models import load_model

    path = args.model
    if (path is None) == (args.model_factory is None):
        raise UsageError("--model and --model-factory exclude each other" if path is not None else
                         "give --model FILE (a checkpoint or a torch.export .pt2) or --model-factory pkg.module:function")
    if path is None:
        return _check_model(_factory_model(args), ds, "--model-factory").eval()
    if args.weights is not None:
        raise UsageError("--weights goes with --model-factory (a --model file holds its weights)")
    if not Path(path).is_file():
        raise UsageError(f"--model {path}: no such file")
    try:
        model = load_exported(path) if Path(path).suffix == ".pt2" else load_model(path)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--model {path}: {e}") from None
    return _check_model(_normalized(model, args), ds, f"--model {path}").eval()


def _holding_out(command):
    """Runs ``command`` holding its --out directory: a second robust-ext process on it stops at once. The ranks
    of one torchrun job share their --out: rank 0 holds it for them."""
    @functools.wraps(command)
    def run(args) -> int:
        if os.environ.get("RANK", "0") != "0":
            return command(args)
        with run_dir_lock(args.out):
            return command(args)
    return run


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def cmd_info(args) -> int:
    from . import backend, build_info
    from .data import available_datasets

    print(dumps({"backend": backend(), "build": build_info(), "datasets": available_datasets()}, indent=2))
    return 0


@_holding_out
def cmd_demo(args) -> int:
    from .demo import format_demo, run_demo

    check_out_dir(args.out)
    kwargs = dict(epochs=args.epochs, steps=20, amp=args.amp, seed=args.seed, progress=_progress(args),
                  aa_points=args.aa_points)
    if args.quick:  # CI's smoke run: same pipeline, small data, few epochs
        kwargs.update(epochs=min(args.epochs, 2), n_train=1000, n_test=200, aa_points=min(args.aa_points, 50))
    summary = run_demo(args.out, **kwargs)
    print(format_demo(summary))
    files = ["demo.json", "accuracy_vs_eps.png", "standard_vs_robust.png", "adversarial_examples.png",
             "pgd_probabilities.png", "standard_report.json", "robust_report.json", "standard_autoattack.json",
             "robust_autoattack.json"]
    print(f"\nwrote {', '.join(f'{args.out}/{f}' for f in files)}; checkpoints and training logs in "
          f"{args.out}/standard and {args.out}/robust")
    return 0


@_holding_out
def cmd_tradeoff(args) -> int:
    from .demo import run_tradeoff

    if len(set(args.eps)) != len(args.eps):
        raise UsageError(f"--eps: each training eps once, got {','.join(f'{e:g}' for e in args.eps)}")
    check_out_dir(args.out)
    summary = run_tradeoff(args.out, eps_values=args.eps, eval_eps=args.eval_eps, epochs=args.epochs, amp=args.amp,
                           seed=args.seed, progress=_progress(args), n_test=args.n)
    print(f"{'train eps':>10}{'clean':>8}{'PGD-20':>8}{'AutoAttack':>12}   (eps = {args.eval_eps}; "
          f"{summary['config']['n_test']} test digits; AutoAttack {summary['config']['autoattack']['version']})")
    for r in summary["rows"]:
        print(f"{r['train_eps']:>10g}{r['clean']:>8.1%}{r['pgd']:>8.1%}{r['autoattack']:>12.1%}")
    print(f"\nwrote {args.out}/tradeoff.json and tradeoff.png")
    return 0


@_holding_out
def cmd_train(args) -> int:
    import torch

    from .models import available_models, build_model
    from .training import train

    if args.model_factory is not None and args.arch is not None:
        raise UsageError("--arch and --model-factory exclude each other")
    if args.weights is not None and args.model_factory is None:
        raise UsageError("--weights goes with --model-factory (initial weights of your own model)")
    arch = args.arch or "small_cnn"
    if args.model_factory is None and arch not in available_models():
        raise UsageError(f"--arch {arch!r} is unknown; known: {', '.join(available_models())}")
    check_out_dir(args.out)
    train_set = _load_data(args, "train")
    test_set = _load_data(args, "test")
    channels, height, width = train_set[0][0].shape
    # mnist-idx counts classes per split (up to the largest label): the model needs the larger count
    config = {"in_channels": channels, "num_classes": max(train_set.num_classes, test_set.num_classes)}
    if arch == "small_cnn":
        config["input_size"] = [height, width]
    with torch.random.fork_rng(devices=[]):  # --seed decides the initial weights too
        torch.manual_seed(args.seed)
        if args.model_factory is not None:
            model = _check_model(_factory_model(args), train_set, "--model-factory")
        else:
            try:
                model = _normalized(build_model(arch, **config), args)
            except (ValueError, TypeError) as e:
                raise UsageError(f"--arch {arch} cannot take the {channels}x{height}x{width} images of --data "
                                 f"{args.data}: {e}") from None
            model = _check_model(model, train_set, f"--arch {arch}")  # and --mean/--std against the channels
    try:
        result = train(model, train_set, test_set, method=args.method, norm=args.norm, fuse=args.fuse, epochs=args.epochs, eps=args.eps,
                       lr=args.lr, batch_size=args.batch_size, amp=args.amp, seed=args.seed, out_dir=args.out,
                       progress=_progress(args), resume=args.resume, clip_min=args.clip_min, clip_max=args.clip_max)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    print(dumps({"final": result.final, "best": str(result.best_path), "last": str(result.last_path),
                 "stopped_early": result.stopped_early, "stop_reason": result.stop_reason}, indent=2, default=str))
    return 0


@_holding_out
def cmd_attack(args) -> int:
    import torch

    from .attacks.registry import get_attack
    from .evaluation._inputs import logits_of, nonfinite_message, nonfinite_rows
    from .evaluation.metrics import perturbation_norms, success_rate
    from .evaluation.plots import plot_adversarial_examples

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = check_out_dir(args.out)
    ds = _load_data(args, args.split)
    model = _load_model(args, ds)
    if args.fuse:
        from .fuse import fuse

        model = fuse(model)
    x, y = ds.tensors
    gen = torch.Generator().manual_seed(args.seed)
    entry = get_attack(args.attack)
    # The flags the attack takes (fgsm has no steps, noise no alpha); PGD keeps every step's iterate.
    given = {"steps": args.steps, "alpha": args.alpha, "restarts": args.restarts, "early_stop": False,
             "amp": args.amp}
    given = {k: v for k, v in given.items() if v is not None or k == "alpha"}  # the attack's own defaults
    params = entry.params(**{k: v for k, v in given.items() if k in entry.defaults})
    alpha = entry.alpha(args.eps, params)

    def run(xb, yb):
        return entry(model, xb, yb, args.eps, norm=args.norm, clip_min=args.clip_min, clip_max=args.clip_max,
                     generator=gen, **params)
    chunks = []
    from tqdm import tqdm
    for start in tqdm(range(0, len(x), args.batch_size), disable=not _progress(args), desc=args.attack):
        chunks.append(run(x[start:start + args.batch_size], y[start:start + args.batch_size]))
    x_adv = torch.cat(chunks)
    clean_logits = torch.cat([logits_of(model, b) for b in x.split(args.batch_size)])
    clean_pred = clean_logits.argmax(1)
    adv_pred = torch.cat([logits_of(model, b).argmax(1) for b in x_adv.split(args.batch_size)])
    correct = clean_pred == y
    robust = correct & (adv_pred == y)
    broken = int(nonfinite_rows(clean_logits).sum())
    warnings = [nonfinite_message(broken, len(x))] if broken else []
    for w in warnings:
        print(f"robust-ext: warning: {w}", file=sys.stderr)
    linf, l2 = perturbation_norms(x_adv, x)
    norms = {"linf_mean": linf.mean().item(), "linf_max": linf.max().item(), "l2_mean": l2.mean().item(),
             "l2_max": l2.max().item()}
    result = {"model": args.model or args.model_factory, "data": args.data, "split": args.split, "n": len(x), "attack": args.attack,
              "norm": args.norm, "eps": args.eps, "alpha": alpha, "steps": params.get("steps", 1),
              "amp": params.get("amp", False),
              "clean_accuracy": correct.float().mean().item(), "robust_accuracy": robust.float().mean().item(),
              "success_rate": success_rate(int(correct.sum()), int(robust.sum())), "norms": norms,
              "nonfinite_logits": broken, "warnings": warnings}
    torch.save({"x_adv": x_adv, "y": y, "clean_pred": clean_pred, "adv_pred": adv_pred}, out / "adversarial.pt")
    write_json(out / "attack.json", result)
    plot_adversarial_examples(model, x[:8], y[:8], x_adv[:8], out / "adversarial_examples.png")
    print(dumps(result, indent=2))
    print("wrote " + ", ".join(str(out / f) for f in ("attack.json", "adversarial.pt", "adversarial_examples.png")),
          file=sys.stderr)
    return 0


@_holding_out
def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, make_attack

    check_out_dir(args.out)
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    if not names:
        raise UsageError("--attacks: give one or more attack names (robust-ext evaluate --help lists them)")
    if "autoattack" in names and len(names) > 1:
        raise UsageError(f"--attacks: autoattack runs alone (its attack list is --version's), got {args.attacks!r}")
    ds = _load_data(args, args.split)
    model = _load_model(args, ds)
    if names == ["autoattack"]:
        import torch.distributed as dist

        from .evaluation import autoattack

        aa = autoattack(model, ds, eps=args.eps, norm=args.norm, version=args.version, fuse=args.fuse, seed=args.seed,
                        progress=_progress(args), model_name=Path(args.model).name if args.model else args.model_factory,
                        data_name=args.data, clip_min=args.clip_min, clip_max=args.clip_max, state_path=args.out,
                        amp=args.amp, return_adversarial=False)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return 0  # one report, written by rank 0
        aa.to_json(Path(args.out) / "autoattack.json")
        print(aa.summary())
        print(f"\nwrote {args.out}/autoattack.json (resumable from {args.out}/autoattack_state.pt and chunks/)")
        return 0
    specs = []
    flags = {"steps": args.steps, "amp": args.amp or None}  # None: the attack's own default
    for name in names:
        takes = _attack_params(name)
        try:
            specs.append(make_attack(name, **{k: v for k, v in flags.items() if v is not None and k in takes}))
        except ValueError as e:
            raise UsageError(f"--attacks: {e}") from None
    report = evaluate(model, ds, specs, eps=args.eps, norm=args.norm, fuse=args.fuse, min_eps=not args.no_min_eps, seed=args.seed,
                      progress=_progress(args), model_name=Path(args.model).name if args.model else args.model_factory,
                      data_name=args.data, plot_dir=args.out, clip_min=args.clip_min, clip_max=args.clip_max)
    report.to_json(Path(args.out) / "report.json")
    print(report.summary())
    written = [Path(args.out) / "report.json", *map(Path, report.plots or [])]
    print("\nwrote " + ", ".join(str(w) for w in written))
    return 0


def _attack_params(name: str):
    from .attacks.registry import ATTACKS

    return ATTACKS[name].defaults if name in ATTACKS else {}


_DATA_HELP = ("a built-in set (robust-ext info lists them), file:PATH (.npz or .pt with arrays x, y) or "
              "folder:DIR (images + labels.csv of filename,label) (default: mnist5k)")


def _add_own_model_flags(a, train: bool) -> None:
    """The flags that bring a model of your own, its normalization and its input bounds."""
    a.add_argument("--model-factory", metavar="PKG.MODULE:FUNCTION",
                   help="a function returning your nn.Module, importable from the current directory or the Python "
                   "path" + (" (the model to train, instead of --arch)" if train else " (instead of --model)"))
    a.add_argument("--weights", help="a state_dict (torch.save(model.state_dict(), F)) or robust_ext checkpoint for "
                   "--model-factory's model" + (" to start from" if train else ""))
    a.add_argument("--mean", type=_finite_list, help="per-channel mean, e.g. 0.49,0.48,0.45: the model normalizes "
                   "its inputs (with --std)")
    a.add_argument("--std", type=_finite_list, help="per-channel std, e.g. 0.25,0.24,0.26 (with --mean)")
    a.add_argument("--clip-min", type=float, default=0.0, help="smallest valid input value (default: 0)")
    a.add_argument("--clip-max", type=float, default=1.0, help="largest valid input value (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    from .attacks.registry import ATTACKS
    from .attacks.threats import NORMS
    from .evaluation.autoattack_versions import VERSIONS
    from .training.config import methods

    norms = tuple(NORMS)
    p = _Parser(prog="robust-ext", description=DESCRIPTION)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="backend, build and data sets", description="Print which backend serves the ops, "
                   "how the extension was built and which data sets are available, as JSON.")

    d = sub.add_parser("demo", help="standard vs FGSM-RS robust CNN on 5,000 real MNIST digits (MATLAB example)")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--epochs", type=int, default=10, help="training epochs of each model")
    d.add_argument("--amp", type=_amp, default="auto",
                   help="auto (default: bf16 autocast on a CPU with native bf16 convolutions, fp16 on CUDA, else "
                   "fp32) | on | off (fp32) | bf16 | fp16")
    d.add_argument("--seed", type=_seed, default=0, help="data order, initialization and attacks' random starts")
    d.add_argument("--quick", action="store_true",
                   help="a short run (1,000 training digits, 2 epochs, AutoAttack on 50) for smoke tests")
    d.add_argument("--aa-points", type=_positive_int, default=200,
                   help="test digits the AutoAttack (fast) curves and targets run on (default: 200; the MATLAB "
                        "example's FGSM/BIM run on all)")

    t = sub.add_parser("tradeoff", help="train at several eps, plot clean vs AutoAttack (and PGD-20) accuracy")
    t.add_argument("--out", default="tradeoff_out", help="output directory")
    t.add_argument("--eps", type=_floats, default=[0.0, 0.05, 0.1, 0.15, 0.2], help="training eps values")
    t.add_argument("--eval-eps", type=_number, default=0.1, help="the eps of the PGD-20 and AutoAttack evaluations")
    t.add_argument("--epochs", type=int, default=5, help="training epochs of each model")
    t.add_argument("-n", type=_positive_int, default=200,
                   help="test digits to evaluate with PGD-20 and AutoAttack (fast) (default: 200)")
    t.add_argument("--amp", type=_amp, default="auto", help="auto (default: as demo) | on | off | bf16 | fp16")
    t.add_argument("--seed", type=_seed, default=0, help="data order, initialization and attacks' random starts")

    tr = sub.add_parser("train", help="train a model (standard, fgsm_rs or pgd) on a data set")
    tr.add_argument("--data", default="mnist5k", help=_DATA_HELP)
    tr.add_argument("--data-dir", help="where the built-in set's files are, for sets read from files you hold "
                    "(IDX, CIFAR)")
    tr.add_argument("--arch", default=None, help="a built-in architecture (default: small_cnn)")
    _add_own_model_flags(tr, train=True)
    tr.add_argument("--method", default="fgsm_rs", choices=methods(), help="training method (default: fgsm_rs)")
    tr.add_argument("--norm", default="linf", choices=norms, help="threat model of the training attack (default: linf)")
    tr.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                    help="the training attacks run the model with its ReLU + max-pool and BatchNorm + ReLU on the "
                    "fused layers (default: on)")
    tr.add_argument("--eps", type=_number, default=0.1, help="radius of the training attack, e.g. 0.1 or 8/255 "
                    "(default: 0.1)")
    tr.add_argument("--epochs", type=int, default=10, help="training epochs")
    tr.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam)")
    tr.add_argument("--batch-size", type=int, default=128, help="images per training batch")
    tr.add_argument("--amp", type=_amp, default=False,
                    help="off (default: fp32) | auto | on (bf16 autocast on CPU, fp16 on CUDA) | bf16 | fp16")
    tr.add_argument("--seed", type=_seed, default=0, help="initialization, data order and attacks' random starts: "
                    "the same command and thread count give the same weights")
    tr.add_argument("--out", required=True, help="run directory: checkpoints last.pt/best.pt, metrics.jsonl, "
                    "curves.png (one writer at a time)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")

    for name, help_ in (("attack", "attack a saved model, save the adversarial examples"),
                        ("evaluate", "robustness report of a saved model")):
        a = sub.add_parser(name, help=help_)
        a.add_argument("--model", help="checkpoint written by robust-ext train / demo, or a torch.export archive "
                       "(.pt2; loaded with torch.export.load, which unpickles: only files you trust)")
        _add_own_model_flags(a, train=False)
        a.add_argument("--data", default="mnist5k", help=_DATA_HELP)
        a.add_argument("--data-dir", help="where the built-in set's files are, for sets read from files you hold "
                       "(IDX, CIFAR)")
        a.add_argument("--split", default=None, help="train, test or all (default: all of file:/folder: data, "
                       "else test)")
        a.add_argument("-n", type=int, default=None, help="use the first N samples")
        a.add_argument("--steps", type=_positive_int, default=None,
                       help="iterations of the iterative attacks (default: each attack's own, e.g. pgd/bim 10, "
                       "apgd 100)")
        a.add_argument("--seed", type=_seed, default=0, help="the attacks' random starts")
        a.add_argument("--out", required=True, help="output directory (one writer at a time)")
        a.add_argument("--norm", default="linf", choices=norms, help="threat model (default: linf)")
        a.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                       help="attack the model with its ReLU + max-pool and BatchNorm + ReLU on the fused layers "
                       "(default: on)")
        a.add_argument("--amp", type=_amp, default=False,
                       help="mixed precision inside the attacks that take it (all but noise, fab, fab_t): off "
                       "(default, fp32) | auto (on a GPU or a CPU with native bf16) | on | bf16 | fp16; a point "
                       "counts as fooled only after a full-precision forward confirms it")
        if name == "attack":
            a.add_argument("--attack", default="pgd", choices=tuple(ATTACKS), help="the attack (default: pgd)")
            a.add_argument("--eps", type=_number, default=0.1, help="budget, e.g. 0.1 or 8/255 (default: 0.1)")
            a.add_argument("--alpha", type=_number, default=None,
                           help="step of fgsm_rs/bim/pgd (default: the attack's rule, e.g. 2.5 * eps / steps)")
            a.add_argument("--restarts", type=_positive_int, default=1,
                           help="random restarts (pgd, apgd), the worst case kept")
            a.add_argument("--batch-size", type=int, default=256, help="images per attack call")
        else:
            a.add_argument("--attacks", default="fgsm,pgd", help=f"comma-separated, of {', '.join(ATTACKS)} "
                           "(default: fgsm,pgd); or autoattack: the AutoAttack ensemble (see --version), resumable "
                           "from --out")
            a.add_argument("--version", default="standard", choices=tuple(VERSIONS),
                           help="AutoAttack's version with --attacks autoattack: standard, plus, rand (the "
                                "original's) or fast (APGD-CE, APGD-T on 3 MALT-ranked targets, FAB-T on 3 targets; "
                                "Square only where the checks call for it) (default: standard)")
            a.add_argument("--eps", type=_floats, default=[0.05, 0.1, 0.2, 0.3],
                           help="comma-separated budgets, e.g. 2/255,4/255,8/255 (default: 0.05,0.1,0.2,0.3)")
            a.add_argument("--no-min-eps", action="store_true", help="skip the per-sample minimal eps bisection")
    return p


COMMANDS = {"info": cmd_info, "demo": cmd_demo, "tradeoff": cmd_tradeoff, "train": cmd_train,
            "attack": cmd_attack, "evaluate": cmd_evaluate}


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"robust-ext: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the library's argument checks (e.g. --eps -1, --steps 0) name the argument
        print(f"robust-ext: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
