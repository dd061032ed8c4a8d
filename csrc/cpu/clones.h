// RX_CLONES: a CPU loop compiled for AVX-512, AVX2 and baseline x86-64, the best one picked at run time
// (GCC target_clones). An AVX-512-only build would die with SIGILL on other CPUs (NOTES.md).
//
// ROBUST_EXT_CPU_ISA=avx2|baseline (setup.py) builds every loop for that one ISA instead (RX_ISA_V3,
// RX_ISA_BASELINE), and leaves out the hand-written AVX-512 code: so that an AVX-512 machine can run the
// code the other clones hold (.ci/check_isa.sh runs the kernel tests on both). RX_AVX512_CODE says
// whether the hand-written AVX-512 paths are compiled, RX_AVX2_CODE the AVX2 ones (all but the baseline
// build).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#if defined(RX_ISA_V3)
#define RX_CLONES __attribute__((target("arch=x86-64-v3")))
#define RX_ISA_ONLY "x86-64-v3 (AVX2) only, forced by ROBUST_EXT_CPU_ISA"
#elif defined(RX_ISA_BASELINE)
#define RX_CLONES
#define RX_ISA_ONLY "baseline x86-64 only, forced by ROBUST_EXT_CPU_ISA"
#else
#define RX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define RX_AVX512_CODE 1
#endif
#if !defined(RX_ISA_BASELINE)
#define RX_AVX2_CODE 1
#endif
#else
#define RX_CLONES
#endif

// A lambda that a RX_CLONES loop calls per element: always inlined (GCC's inliner otherwise gives up on
// some, e.g. with c10::BFloat16 conversions inside, and the loop calls a function per element).
#if defined(__GNUC__)
#define RX_INLINE_LAMBDA __attribute__((always_inline))
#else
#define RX_INLINE_LAMBDA
#endif
