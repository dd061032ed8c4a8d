"""robust_ext.training: config checks, the guard, learning, exact resume (also after SIGKILL), the monitor's
files, and a two-process torchrun run against a single-process one. Tiny data, 1-2 epochs."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import _train_worker as worker
from _procs import sigkill_when
from robust_ext.models import load_checkpoint, load_model
from robust_ext.training import CollapseGuard, TrainConfig, loop, read_metrics, train

WORKER = str(Path(__file__).with_name("_train_worker.py"))
TINY = dict(epochs=1, batch_size=32, progress=False, plot=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads per process thrash in OpenMP barriers
    (measured 4x slower than one under a load of 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return worker.subset(128)


def _equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_worker(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(WORKER).parent),
                                                                     os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, WORKER, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, field", [
    (dict(method="fgsm"), "method"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(scheduler="step"), "scheduler"),
    (dict(momentum=1.5), "momentum"),
    (dict(method="fgsm_rs"), "eps"),
    (dict(method="pgd", eps=-0.1), "eps"),
    (dict(method="pgd", eps=0.1, pgd_steps=0), "pgd_steps"),
    (dict(method="fgsm_rs", eps=0.1, mix_ratio=1.5), "mix_ratio"),
    (dict(mix_ratio=0.5), "mix_ratio"),
    (dict(alpha=0.1), "alpha"),
    (dict(amp="bf16"), "amp"),
    (dict(guard_drop=2.0), "guard_drop"),
    (dict(guard=True), "guard"),
    (dict(clip_min=1.0, clip_max=0.0), "clip_min"),
    (dict(eval_samples=-1), "eval_samples"),
    (dict(threads=0), "threads"),
    (dict(progress="yes"), "progress"),
    (dict(device="gpu0"), "device"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_config_defaults_follow_the_papers():
    fast = TrainConfig(method="fgsm_rs", eps=0.1)
    assert fast.attack_alpha == pytest.approx(0.125) and fast.adv_weight == 1.0 and fast.guard_on
    pgd = TrainConfig(method="pgd", eps=0.3, pgd_steps=40)
    assert pgd.attack_alpha == pytest.approx(2.5 * 0.3 / 40) and not pgd.guard_on
    assert pgd.robust_eps == 0.3 and pgd.robust_alpha == pytest.approx(2.5 * 0.3 / 10)
    assert not TrainConfig().robust_eval and not TrainConfig().guard_on


def test_train_argument_errors(tiny, tmp_path):
    with pytest.raises(TypeError, match="unknown TrainConfig field"):
        train(worker.fresh_model(), tiny, learning_rate=0.1)
    with pytest.raises(ValueError, match="out_dir"):
        train(worker.fresh_model(), tiny, resume=True, **TINY)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train(worker.fresh_model(), tiny, resume=tmp_path / "nope.pt", **TINY)
    with pytest.raises(TypeError, match="train_set"):
        train(worker.fresh_model(), [(torch.zeros(1, 28, 28), 0)], **TINY)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # not from build_model: cannot be checkpointed
    before = [p.clone() for p in plain.parameters()]
    with pytest.raises(ValueError, match="build_model"):
        train(plain, tiny, out_dir=tmp_path, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.parameters())), "failed after training"


# ------------------------------------------------------------------------------------------ guard
def test_guard_sequences():
    g = CollapseGuard(drop=0.2)
    assert [g.update(e, a) for e, a in enumerate([0.3, 0.5, 0.4, 0.31], 1)] == [None] * 4  # drop 0.19 < 0.2
    assert "fell from 0.5000 (epoch 2) to 0.2000 (epoch 5)" in g.update(5, 0.2)
    floor = CollapseGuard(drop=1.0, floor=0.3)
    assert floor.update(1, 0.1) is None and floor.update(2, 0.35) is None  # below the floor before reaching it
    assert "guard_floor=0.3" in floor.update(3, 0.25)
    assert "NaN" in CollapseGuard().update(1, math.nan)
    restored = CollapseGuard(drop=0.2)
    restored.load_state_dict(g.state_dict())
    assert restored.update(6, 0.25) is not None


def test_guard_stops_training_and_keeps_the_best(tiny, tmp_path, monkeypatch, caplog):
    """A fake robust-accuracy sequence: 0.5, 0.6, then a collapse to 0.3 at epoch 3 of 5."""
    accs = iter([0.5, 0.6, 0.3, 0.7, 0.7])
    monkeypatch.setattr(loop._Run, "_evaluate", lambda self: {"robust_acc": next(accs), "robust_on": "train"})
    weights = {}
    cfg = TrainConfig(method="fgsm_rs", eps=0.1, epochs=5, batch_size=64, progress=False, plot=False,
                      eval_samples=8, out_dir=str(tmp_path))
    model = worker.fresh_model()
    with caplog.at_level(logging.WARNING, logger="robust_ext.training"):
        result = train(model, tiny, None, cfg, on_epoch_end=lambda r: weights.update(
            {r["epoch"]: {k: v.clone() for k, v in model.state_dict().items()}}))
    assert result.stopped_early and result.epochs_completed == 3
    assert "catastrophic overfitting" in result.stop_reason and "from 0.6000 (epoch 2)" in result.stop_reason
    assert [r["collapsed"] for r in result.history] == [False, False, True]
    assert any("catastrophic overfitting" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert (result.best_epoch, result.best_value, result.best_metric) == (2, 0.6, "robust_acc")
    best = load_checkpoint(result.best_path)
    assert best["best"]["epoch"] == 2 and _equal_weights(best["state_dict"], weights[2])
    assert _equal_weights(model.state_dict(), weights[2]) and not _equal_weights(weights[2], weights[3])
    assert [r["event"] for r in read_metrics(result.log_path, None)][-2:] == ["epoch", "stop"]
    # a resumed collapsed run does not train on
    again = train(worker.fresh_model(1), tiny, None, cfg, resume=True)
    assert again.epochs_completed == 3 and again.stop_reason == result.stop_reason
    assert _equal_weights(load_model(result.last_path).state_dict(), weights[3])


def test_a_diverged_run_stops_whatever_the_method(tiny, tmp_path):
    # Before: --lr 1e30 trained every epoch on NaN weights and saved them as the best model (robust accuracy
    # 0.10: a NaN model predicts class 0), with no word.
    result = train(worker.fresh_model(), tiny, None, method="standard", epochs=3, batch_size=64, lr=1e30,
                   progress=False, plot=False, eval_samples=8, out_dir=str(tmp_path))
    assert result.stopped_early and result.epochs_completed == 1
    assert re.match(r"diverged: the training loss is (nan|inf) at epoch 1", result.stop_reason)
    assert result.history[0]["collapsed"] and result.best_epoch is None


# ------------------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def standard_and_fast():
    """Standard and FGSM-RS training, one epoch each on 1,500 MNIST digits, PGD-10 at eps=0.2 after."""
    train_set, test_set = worker.subset(1500), worker.subset(200, "test")
    out = {}
    for method, extra in (("standard", {}), ("fgsm_rs", {"eps": 0.2})):
        out[method] = train(worker.fresh_model(), train_set, test_set, method=method, epochs=1, batch_size=64,
                            amp=True, eval_eps=0.2, eval_samples=200, progress=False, **extra)
    return out


# slow (about 130 s here): one epoch each with amp=True (bf16 autocast; this CPU has no native bf16).
@pytest.mark.slow
def test_standard_training_learns(standard_and_fast):
    final = standard_and_fast["standard"].final
    assert final["test_acc"] > 0.6 and final["train_acc"] > 0.4  # chance is 0.1; measured 0.77-0.85
    assert final["train_loss"] < 2.0


@pytest.mark.slow  # shares the fixture above
def test_fgsm_rs_is_more_robust_than_standard(standard_and_fast):
    # measured with seeds 0-3: standard 0.035-0.095, FGSM-RS 0.31-0.39
    std, fast = standard_and_fast["standard"].final, standard_and_fast["fgsm_rs"].final
    assert fast["robust_acc"] > std["robust_acc"] + 0.15, (std, fast)
    assert fast["test_acc"] > 0.6


class _BNNet(nn.Module):
    """Records, per forward, the batch size and whether the BatchNorm was in training mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 13 * 13, 10))
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.body[1].training))
        return self.body(x)


@pytest.mark.parametrize("method, mix", [("fgsm_rs", None), ("pgd", 0.5), ("pgd", 0.0)])
def test_attack_runs_in_eval_mode_and_leaves_bn_stats_alone(tiny, method, mix):
    net = _BNNet()
    result = train(net, tiny, None, method=method, eps=0.1, pgd_steps=2, mix_ratio=mix, eval_samples=0, **TINY)
    steps = len(tiny) // 32
    attack_calls = 0 if mix == 0 else steps * (1 if method == "fgsm_rs" else 2)
    train_batch = 64 if mix == 0.5 else 32
    assert sorted(net.calls) == sorted([(32, False)] * attack_calls + [(train_batch, True)] * steps)
    assert net.body[1].num_batches_tracked.item() == steps  # only the training forwards updated BN
    assert net.training and math.isfinite(result.final["train_loss"])
    assert ("train_clean_acc" in result.final) == (mix == 0.5)


def test_amp_fp16_uses_a_grad_scaler_and_channels_last(tiny, tmp_path):
    result = train(worker.fresh_model(), torch.utils.data.Subset(tiny, range(64)), None, method="fgsm_rs",
                   eps=0.1, amp=torch.float16, channels_last=True, eval_samples=0, out_dir=tmp_path, **TINY)
    scaler = load_checkpoint(result.last_path)["training"]["scaler"]
    assert scaler["scale"] > 0 and math.isfinite(result.final["train_loss"])


def test_data_paths_agree(tiny):
    """A Subset (index-mapped tensors), the same images as their own ImageDataset (tensors) and a plain
    Dataset (DataLoader) give the same batches, so the same weights."""
    idx = torch.randperm(len(tiny), generator=torch.Generator().manual_seed(1))[:96]
    own = worker.ImageDataset(tiny.images[idx], tiny.labels[idx], name="t", split="train", classes=tiny.classes,
                              source="")
    runs = []
    for data in (torch.utils.data.Subset(tiny, idx.tolist()), own, worker.Recording(own)):
        model = worker.fresh_model()
        train(model, data, None, **TINY)
        runs.append(model.state_dict())
    assert _equal_weights(runs[0], runs[1]) and _equal_weights(runs[1], runs[2])


@pytest.mark.parametrize("scheduler, final_lr", [("none", 0.01), ("cosine", 0.01 * (1 + math.cos(math.pi * 7 / 8)) / 2),
                                                  ("cyclic", 0.0), ("onecycle", 0.01 / 25 / 1e4)])
def test_schedules_end_where_they_should_and_checkpoint(tiny, tmp_path, scheduler, final_lr):
    result = train(worker.fresh_model(), tiny, None, lr=0.01, scheduler=scheduler, optimizer="sgd", out_dir=tmp_path,
                   epochs=2, batch_size=32, progress=False, plot=False)
    assert result.final["lr"] == pytest.approx(final_lr, rel=1e-6, abs=1e-12)  # the last of 8 steps
    assert load_checkpoint(result.last_path)["training"]["scheduler"] is not None or scheduler == "none"


# ------------------------------------------------------------------------------------------ monitor
def test_metrics_log_curves_and_progress(tiny, tmp_path, capsys):
    result = train(worker.fresh_model(), tiny, worker.subset(64, "test"), epochs=2, batch_size=32, log_every=2,
                   out_dir=tmp_path)  # progress=None: pytest's stderr is not a terminal
    assert "batch/s" not in capsys.readouterr().err
    lines = read_metrics(result.log_path, None)
    assert [r["event"] for r in lines] == ["start"] + ["batch", "batch", "epoch"] * 2
    epochs = read_metrics(result.log_path)
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[1]["test_acc"] == result.history[1]["test_acc"]
    assert lines[0]["config"]["batch_size"] == 32 and lines[1]["batch"] == 2
    png = result.plot_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert result.best_metric == "test_acc" and result.best_path.is_file()
    train(worker.fresh_model(), tiny, progress=True, **{k: v for k, v in TINY.items() if k != "progress"})
    assert "epoch 1/1" in capsys.readouterr().err


def test_resume_restores_the_epoch_line_a_kill_after_the_checkpoint_lost(tiny, tmp_path):
    """A kill between last.pt's rename and the metrics line: the log lacks an epoch the checkpoint holds.
    Resuming writes that line from the checkpoint, once; a half-written last line is cut first."""
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=2, batch_size=32, progress=False, plot=False)
    first = train(worker.fresh_model(), tiny, None, cfg)
    log_path = first.log_path
    lines = log_path.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["event"] == "epoch" and json.loads(lines[-1])["epoch"] == 2
    log_path.write_text("".join(lines[:-1]) + '{"event": "batch", "epo')  # lost line, then a torn one
    for _ in range(2):  # the second resume finds the log complete and adds no epoch line
        again = train(worker.fresh_model(), tiny, None, cfg, resume=True)
        assert again.epochs_completed == 2
        epochs = read_metrics(log_path)
        assert [r["epoch"] for r in epochs] == [1, 2]
        assert {k: v for k, v in epochs[1].items() if k != "time"} == {"event": "epoch", **first.history[1]}
    assert [r["event"] for r in read_metrics(log_path, None)] == ["start", "epoch", "epoch", "resume", "resume"]


# ------------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The resume tests' reference: their two-epoch run, uninterrupted, in this process."""
    model = worker.fresh_model()
    out = tmp_path_factory.mktemp("straight")
    result = train(model, worker.subset(worker.RESUME_N), worker.subset(32, "test"),
                   TrainConfig(out_dir=str(out), **worker.RESUME_CONFIG))
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def test_resume_in_a_fresh_process_is_bit_identical(straight_run, tmp_path):
    weights, straight = straight_run
    cfg = TrainConfig(out_dir=str(tmp_path), **worker.RESUME_CONFIG)
    first = train(worker.fresh_model(), worker.subset(worker.RESUME_N), worker.subset(32, "test"), cfg,
                  on_epoch_end=lambda record: True)
    assert first.epochs_completed == 1 and first.stop_reason == "stopped by on_epoch_end after epoch 1"
    proc = _run_worker("train", tmp_path, "--resume", "--weights", tmp_path / "w.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _equal_weights(torch.load(tmp_path / "w.pt", weights_only=True), weights)
    resumed = load_checkpoint(tmp_path / "last.pt")["training"]
    strip = ("train_time_s", "images_per_s", "eval_time_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed["history"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in straight.history]
    with pytest.raises(ValueError, match="lr: 0.002 -> 0.001"):
        train(worker.fresh_model(), worker.subset(worker.RESUME_N), None, cfg, resume=True, lr=1e-3)


@pytest.mark.slow  # the default run keeps the fresh-process resume above and AutoAttack's SIGKILL test
def test_sigkill_mid_epoch_then_resume(straight_run, tmp_path):
    weights, _ = straight_run
    env = dict(os.environ, PYTHONPATH=str(Path(WORKER).parent))
    log_path = tmp_path / "metrics.jsonl"
    sigkill_when([WORKER, "train", str(tmp_path), "--slow"], env,
                 lambda: any(r.get("event") == "batch" and r["epoch"] == 2 and r["batch"] >= 3
                             for r in _lines(log_path)), 90)
    checkpoint = load_checkpoint(tmp_path / "last.pt")  # torch.load(weights_only=True) inside
    assert checkpoint["training"]["epoch"] == 1, "the kill was meant to land in epoch 2"
    load_model(tmp_path / "last.pt")
    model = worker.fresh_model(1)
    result = train(model, worker.subset(worker.RESUME_N), worker.subset(32, "test"),
                   TrainConfig(out_dir=str(tmp_path), **worker.RESUME_CONFIG), resume=True)
    assert result.epochs_completed == 2 and result.resumed_from == tmp_path / "last.pt"
    assert _equal_weights(model.state_dict(), weights)
    assert [r["epoch"] for r in read_metrics(log_path)] == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))


def _lines(path: Path):
    """The complete JSON lines of a log another process is writing."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ------------------------------------------------------------------------------------------ torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the default run keeps test_autoattack.py's torchrun test
def test_torchrun_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(WORKER).parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", WORKER, "ddp", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers (each in its own session) and waits
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail("torchrun timed out:\n" + err[-4000:])
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # every sample exactly once per epoch, over the two processes
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(512))
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 256
    assert _equal_weights(ranks[0]["state_dict"], ranks[1]["state_dict"])
    assert ranks[0]["history"][0]["train_acc"] == ranks[1]["history"][0]["train_acc"]  # all-reduced
    # rank 0 alone wrote the log: one start and one epoch line, not two
    assert [r["event"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", None)] == ["start", "epoch"]

    # One process, the same global batch of 64: each step's batch is the union of the two ranks' batches,
    # so DDP's average of two half-batch mean gradients is this run's gradient up to float rounding.
    # Measured: max |difference| 7e-8 after the 8 SGD steps, while the weights moved by 0.02-0.04.
    model, start = worker.fresh_model(), worker.fresh_model().state_dict()
    single = train(model, worker.subset(512), None, TrainConfig(threads=1, **worker.DDP_CONFIG))
    for name, w in model.state_dict().items():
        moved = (w - start[name]).abs().max().item()
        assert moved > 5e-3, name
        torch.testing.assert_close(ranks[0]["state_dict"][name], w, rtol=0, atol=1e-5, msg=name)
    assert single.final["train_loss"] == pytest.approx(ranks[0]["history"][0]["train_loss"], rel=1e-5)

    # adversarial training with mixing, evaluation and guard in a caller-initialized process group
    adv = [torch.load(tmp_path / f"adv_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert adv[0]["initialized"] and len(adv[0]["history"]) == 2 and adv[0]["stop_reason"] is None
    keys = ("train_loss", "train_acc", "train_clean_acc", "test_acc", "robust_acc")
    assert [[r[k] for k in keys] for r in adv[0]["history"]] == [[r[k] for k in keys] for r in adv[1]["history"]]
    assert load_checkpoint(tmp_path / "adv" / "last.pt")["training"]["world_size"] == 2


def test_read_metrics_decodes_non_finite_values(tmp_path):
    """What MetricsLog encodes as strict JSON ("nan", "inf") comes back as floats."""
    from robust_ext.training.monitor import MetricsLog
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write("epoch", epoch=1, robust_acc=float("nan"), train_loss=float("inf"))
    log.close()
    (rec,) = read_metrics(tmp_path / "m.jsonl")
    assert math.isnan(rec["robust_acc"]) and rec["train_loss"] == math.inf and rec["epoch"] == 1
