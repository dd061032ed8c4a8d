"""Long work shows progress without a terminal: with the bar off (progress=False, or the CLI's stderr not a
terminal) the evaluation logs a line per batch and AutoAttack a line per chunk."""
import logging
import subprocess
import sys

import torch

import _autoattack_worker as worker
from robust_ext.evaluation import autoattack, evaluate
from robust_ext.models import SmallCNN, save_checkpoint


def test_evaluate_logs_a_line_per_batch_without_a_bar(caplog, one_thread):
    model, x, y = worker.case(n=40)
    with caplog.at_level(logging.INFO, logger="robust_ext.evaluation"):
        evaluate(model, (x, y), ["fgsm"], eps=[0.1], batch_size=16, min_eps=False, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate: ")]
    assert [line.split(",")[0] for line in lines] == ["evaluate: 1 of 3 batches done", "evaluate: 2 of 3 batches done"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="robust_ext.evaluation"):
        evaluate(model, (x, y), ["fgsm"], eps=[0.1], batch_size=16, min_eps=False, progress=True)
    assert not [r for r in caplog.records if r.getMessage().startswith("evaluate: ")]


def test_autoattack_logs_a_line_per_chunk_without_a_bar(caplog, one_thread):
    model, x, y = worker.case(n=40)
    with caplog.at_level(logging.INFO, logger="robust_ext.evaluation"):
        autoattack(model, (x, y), eps=0.1, attacks=["apgd"], batch_size=8, progress=False)
    chunks = [r.getMessage() for r in caplog.records if "chunk" in r.getMessage()]
    assert chunks and chunks[0].startswith("autoattack apgd eps=0.1: chunk 1 of ")
    assert any("robust accuracy after apgd" in r.getMessage() for r in caplog.records)


def test_cli_without_a_terminal_prints_progress_lines(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", SmallCNN())
    out = subprocess.run([sys.executable, "-m", "robust_ext.cli", "evaluate", "--model", str(tmp_path / "m.pt"),
                          "--data", "mnist5k", "--split", "test", "-n", "12", "--attacks", "autoattack", "--version",
                          "fast", "--eps", "0.05", "--out", str(tmp_path / "aa")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "autoattack apgd-ce eps=0.05: chunk 1 of 1 done" in out.stderr  # stderr is a pipe here
