"""What the benchmark scripts share: describing the machine they ran on."""
import platform
import sys


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def malloc_in_use() -> str:
    """Which malloc serves this process: a preloaded tcmalloc or jemalloc (seen in /proc/self/maps), else
    the C library's. With glibc's, oneDNN's per-call scratch buffers are page-faulted in again on some
    calls and not on others (docs/performance_tips.md), which moves fp32 timings by up to 30%."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if platform.libc_ver()[0] == "glibc" else "libc"


def warn_if_glibc_malloc(malloc: str) -> None:
    """The hint the benchmarks print when glibc's malloc serves them (its page faults add noise)."""
    if malloc == "glibc":
        print("warning: glibc's malloc page-faults oneDNN's scratch buffers in again on some calls and not "
              "others (fp32 rows move by up to 30%); for clean ratios preload tcmalloc: "
              "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", file=sys.stderr)
