"""Crash tests' shared step: run a worker process and kill it with SIGKILL at a chosen moment."""
import os
import signal
import subprocess
import sys
import time


def sigkill_when(argv, env, ready, timeout: float):
    """Run ``python argv...`` and SIGKILL it as soon as ``ready()`` holds (polled every 10 ms); fails if the
    worker ends first or ``timeout`` seconds pass. Returns the killed process."""
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"worker ended before it was killed: {proc.stderr.read().decode()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return proc
