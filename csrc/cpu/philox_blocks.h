// Philox words for the CPU loops, 2 blocks of 16 counters at a time (philox.h's element contract).
#pragma once

#include <algorithm>
#include <cstdint>

#include <c10/macros/Macros.h>

#include "philox.h"

namespace robust_ext {
namespace cpu {

constexpr int kPhiloxBlocks = 2;
// w[b][word][lane]: word `word` of counter c_base + 16 b + lane.
using PhiloxWords = uint32_t[kPhiloxBlocks][4][math::kLanes];

// The words of counters [c_base, c_base + 16 * kPhiloxBlocks), c_base a multiple of 16. GCC vectorizes
// the 32x32->64-bit products of math::philox4x32_10 with AVX-512's slow 64-bit vpmullq; with AVX-512F
// present, the same rounds run on vpmuludq (even/odd lanes), 2.5x fewer instructions, and two blocks at
// once hide the rounds' latency chain. Bit-identical by construction and by tests/test_random_init.py.
void philox_blocks(uint64_t c_base, uint32_t k0, uint32_t k1, PhiloxWords& w);

// Elements [begin, end) of the logical index space in runs of kPhiloxBlocks aligned 64-element blocks:
// f(i, stop, run, w) for each, w's words computed at once, element j in [i, stop) drawing
// (&w[0][0][0])[j - run] (w's memory order is the elements' order). Inlined into the caller's
// target_clones loop.
template <typename F>
C10_ALWAYS_INLINE void for_philox_runs(int64_t begin, int64_t end, uint32_t k0, uint32_t k1, F f) {
  for (int64_t i = begin; i < end;) {
    const int64_t run = i / math::kBlock * math::kBlock;
    const int64_t stop = std::min(end, run + kPhiloxBlocks * math::kBlock);
    PhiloxWords w;
    philox_blocks(static_cast<uint64_t>(run / math::kBlock) * math::kLanes, k0, k1, w);
    f(i, stop, run, w);
    i = stop;
  }
}

}  // namespace cpu
}  // namespace robust_ext
