"""tune_allocator: freed memory stays in the process (page faults of an alloc/free cycle counted by the
kernel), the command line applies it unless told not to, bad input is refused."""
import subprocess
import sys
import textwrap

import pytest

import robust_ext
from robust_ext import allocator, cli

# Allocates and frees a 64 MiB tensor, touching every page: 10 cycles to settle, then prints the minor page
# faults of 8 more. 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB): untuned, every cycle
# maps fresh pages (16,384 faults of 4 KiB).
CYCLES = textwrap.dedent("""
    import resource, sys, torch
    import robust_ext
    if sys.argv[1] == "tuned":
        print(robust_ext.tune_allocator(), file=sys.stderr)
    def cycle():
        t = torch.empty(1 << 24)
        t.fill_(1.0)
        del t
    for _ in range(10):
        cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode):
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(allocator._mallopt() is None, reason="needs glibc's mallopt (Linux)")
def test_freed_memory_is_reused_without_page_faults():
    pages = 8 * (64 << 20) // 4096
    assert faults("default") > 0.9 * pages  # the premise: glibc maps and unmaps the block every time
    assert faults("tuned") < 0.02 * pages


def test_cli_tunes_unless_told_not_to(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "tune_allocator", lambda: calls.append(1) or {"M_MMAP_THRESHOLD": 1})
    assert cli.main(["-q", "info"]) == 0 and calls == [1]
    assert '"M_MMAP_THRESHOLD": 1' in capsys.readouterr().out
    assert cli.main(["-q", "--default-malloc", "info"]) == 0 and calls == [1]
    assert '"malloc": "unchanged"' in capsys.readouterr().out


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1"])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="limit_bytes must be an int in"):
        robust_ext.tune_allocator(bad)
