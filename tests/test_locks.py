"""One writer per output directory: ``_io.run_dir_lock`` (flock on DIR/.lock) across processes and threads,
its release when the holder dies, and the one-line errors of training and of every CLI command with --out."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from robust_ext._io import LOCK_NAME, run_dir_lock
from robust_ext.cli import main

HOLDER = "import sys; from robust_ext._io import run_dir_lock\n" \
         "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"


@pytest.fixture
def held(tmp_path):
    """A directory another process holds (it releases it when its stdin closes); yields (dir, pid)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_second_process_is_refused_with_the_holders_pid(held):
    out, proc = held
    with pytest.raises(ValueError) as e:
        with run_dir_lock(out):
            pass
    assert str(e.value) == f"--out {out} is in use by another robust-ext process (pid {proc.pid})"
    proc.stdin.close()  # the holder leaves its with-block: the directory is free again
    proc.wait(timeout=30)
    with run_dir_lock(out) as path:
        assert path == out and (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_killed_holder_leaves_no_stale_lock(held):
    out, proc = held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / LOCK_NAME).is_file()  # the file stays; the kernel dropped the flock with the process
    with run_dir_lock(out, flag="out_dir"):
        pass


def test_threads_exclude_each_other_and_the_holder_reenters(tmp_path):
    entered, release, errors = threading.Event(), threading.Event(), []

    def hold():
        with run_dir_lock(tmp_path):
            with run_dir_lock(tmp_path):  # re-entrant in the holding thread (CLI, then training.train)
                entered.set()
                release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    try:
        with run_dir_lock(tmp_path):
            pass
    except ValueError as e:
        errors.append(str(e))
    release.set()
    holder.join(30)
    assert errors == [f"--out {tmp_path} is in use by another robust-ext process (pid {os.getpid()})"]
    with run_dir_lock(tmp_path):  # released once the outer block ended
        pass


def test_lock_checks_the_directory_like_check_out_dir(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="--out .*is an existing file"):
        with run_dir_lock(file):
            pass


def test_training_refuses_a_held_out_dir(held):
    import _train_worker as worker
    from robust_ext.training import train

    out, proc = held
    with pytest.raises(ValueError, match=rf"out_dir {out} is in use by another robust-ext process \(pid {proc.pid}\)"):
        train(worker.fresh_model(), worker.subset(32), epochs=1, batch_size=32, progress=False, out_dir=out)
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()


@pytest.mark.parametrize("argv", [  # each ~2 s (a lock-holding process); the default run keeps train, evaluate
    ["train", "--epochs", "1"],
    pytest.param(["demo", "--quick"], marks=pytest.mark.slow),
    pytest.param(["tradeoff", "--epochs", "1"], marks=pytest.mark.slow),
    ["evaluate", "--model", "/nonexistent.pt"],
    pytest.param(["attack", "--model", "/nonexistent.pt"], marks=pytest.mark.slow),
])
def test_cli_commands_refuse_a_held_out_before_any_work(held, capsys, argv):
    out, proc = held
    code = main(["-q", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"robust-ext: error: --out {out} is in use by another robust-ext process (pid {proc.pid})\n"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_torchrun_ranks_other_than_0_share_rank_0s_out(held, capsys, monkeypatch):
    """The ranks of one torchrun job run the same command on the same --out: only rank 0 takes the lock."""
    out, _ = held
    monkeypatch.setenv("RANK", "1")
    code = main(["-q", "attack", "--model", "/nonexistent.pt", "--out", str(out)])
    assert code == 2 and "--model /nonexistent.pt: no such file" in capsys.readouterr().err
