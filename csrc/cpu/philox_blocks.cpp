// The CPU Philox blocks: hand-written AVX-512 rounds where the CPU has AVX-512F, hand-written AVX2 rounds
// where it has AVX2, else a loop GCC vectorizes per ISA (target_clones).
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/clones.h"
#include "cpu/philox_blocks.h"

namespace robust_ext {
namespace cpu {
namespace {

#if defined(RX_AVX512_CODE)
__attribute__((target("avx512f"))) void philox_blocks_avx512(uint64_t c_base, uint32_t k0, uint32_t k1,
                                                       PhiloxWords& w) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxM1));
  const __m512i w0 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxW0));
  const __m512i w1 = _mm512_set1_epi32(static_cast<int>(math::kPhiloxW1));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr __mmask16 odd = 0xAAAA;
  __m512i c0[kPhiloxBlocks], c1[kPhiloxBlocks], c2[kPhiloxBlocks], c3[kPhiloxBlocks];
  for (int b = 0; b < kPhiloxBlocks; ++b) {
    const uint64_t base = c_base + static_cast<uint64_t>(b) * math::kLanes;
    c0[b] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)), lanes);
    c1[b] = _mm512_set1_epi32(static_cast<int>(base >> 32));
    c2[b] = _mm512_setzero_si512();
    c3[b] = _mm512_setzero_si512();
  }
  __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
  for (int r = 0; r < math::kPhiloxRounds; ++r) {
    for (int b = 0; b < kPhiloxBlocks; ++b) {
      const __m512i e0 = _mm512_mul_epu32(c0[b], m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[b], 32), m0);
      const __m512i e1 = _mm512_mul_epu32(c2[b], m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[b], 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(odd, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e1, 32), o1);
      const __m512i lo1 = _mm512_mask_blend_epi32(odd, e1, _mm512_slli_epi64(o1, 32));
      c0[b] = _mm512_ternarylogic_epi32(hi1, c1[b], key0, 0x96);  // hi1 ^ c1 ^ k0
      c2[b] = _mm512_ternarylogic_epi32(hi0, c3[b], key1, 0x96);  // hi0 ^ c3 ^ k1
      c1[b] = lo1;
      c3[b] = lo0;
    }
    key0 = _mm512_add_epi32(key0, w0);
    key1 = _mm512_add_epi32(key1, w1);
  }
  for (int b = 0; b < kPhiloxBlocks; ++b) {
    _mm512_storeu_si512(w[b][0], c0[b]);
    _mm512_storeu_si512(w[b][1], c1[b]);
    _mm512_storeu_si512(w[b][2], c2[b]);
    _mm512_storeu_si512(w[b][3], c3[b]);
  }
}
const bool kHasAvx512 = __builtin_cpu_supports("avx512f");
#else
constexpr bool kHasAvx512 = false;
void philox_blocks_avx512(uint64_t, uint32_t, uint32_t, PhiloxWords&) {}
#endif

#if defined(RX_AVX2_CODE)
// The same rounds on AVX2: each block's 16 counters are two 8-lane halves, a round's products vpmuludq on
// even and odd lanes (GCC's own vectorization of the 64-bit products is mostly shuffles: 4x slower).
// One block's two halves at a time: eight state registers, enough independent work for the rounds'
// latency.
__attribute__((target("avx2"))) void philox_blocks_avx2(uint64_t c_base, uint32_t k0, uint32_t k1, PhiloxWords& w) {
  constexpr int kHalf = math::kLanes / 2;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(math::kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(math::kPhiloxM1));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int b = 0; b < kPhiloxBlocks; ++b) {
    const uint64_t base = c_base + static_cast<uint64_t>(b) * math::kLanes;
    __m256i c0[2], c1[2], c2[2], c3[2];
    for (int h = 0; h < 2; ++h) {
      c0[h] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base + h * kHalf)), lanes);
      c1[h] = _mm256_set1_epi32(static_cast<int>(base >> 32));
      c2[h] = _mm256_setzero_si256();
      c3[h] = _mm256_setzero_si256();
    }
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < math::kPhiloxRounds; ++r) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(ka)), key1 = _mm256_set1_epi32(static_cast<int>(kb));
      for (int h = 0; h < 2; ++h) {
        const __m256i e0 = _mm256_mul_epu32(c0[h], m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[h], 32), m0);
        const __m256i e1 = _mm256_mul_epu32(c2[h], m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2[h], 32), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
        const __m256i lo0 = _mm256_mullo_epi32(c0[h], m0);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
        const __m256i lo1 = _mm256_mullo_epi32(c2[h], m1);
        c0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), key0);
        c2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), key1);
        c1[h] = lo1;
        c3[h] = lo0;
      }
      ka += math::kPhiloxW0;
      kb += math::kPhiloxW1;
    }
    for (int h = 0; h < 2; ++h) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[b][0] + h * kHalf), c0[h]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[b][1] + h * kHalf), c1[h]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[b][2] + h * kHalf), c2[h]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[b][3] + h * kHalf), c3[h]);
    }
  }
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#else
constexpr bool kHasAvx2 = false;
void philox_blocks_avx2(uint64_t, uint32_t, uint32_t, PhiloxWords&) {}
#endif

RX_CLONES void philox_blocks_generic(uint64_t c_base, uint32_t k0, uint32_t k1, PhiloxWords& w) {
  for (int b = 0; b < kPhiloxBlocks; ++b)
    for (int l = 0; l < math::kLanes; ++l) {
      const math::Philox4 r = math::philox4x32_10(c_base + b * math::kLanes + l, k0, k1);
      w[b][0][l] = r.w[0]; w[b][1][l] = r.w[1]; w[b][2][l] = r.w[2]; w[b][3][l] = r.w[3];
    }
}

}  // namespace

void philox_blocks(uint64_t c_base, uint32_t k0, uint32_t k1, PhiloxWords& w) {
  if (kHasAvx512) {
    philox_blocks_avx512(c_base, k0, k1, w);
  } else if (kHasAvx2) {
    philox_blocks_avx2(c_base, k0, k1, w);
  } else {
    philox_blocks_generic(c_base, k0, k1, w);
  }
}

}  // namespace cpu
}  // namespace robust_ext
