// RX_CLONES: a CPU loop compiled for AVX-512, AVX2 and baseline x86-64, the best one picked at run time
// (GCC target_clones). An AVX-512-only build would die with SIGILL on other CPUs (NOTES.md).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RX_CLONES
#endif
