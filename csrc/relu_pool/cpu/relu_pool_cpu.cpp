// relu_max_pool2d's CPU kernels: max_pool2d(relu(x), 2) in one pass, and its backward.
//
// ATen's bf16 max_pool2d takes 13-18 ms of a 35 ms forward+backward of the small CNN (NCHW), and its
// channels_last backward copies; ReLU adds two more passes. Here the forward reads x once and writes
// the pooled map plus a one-byte code per output (which of the 4 window taps won, or "no gradient"),
// and the backward writes each input element once. Both layouts (NCHW, channels_last) are vectorized
// loops compiled per ISA (GCC target_clones), picked at run time.
//
// Semantics: relu_pool/relu_pool_math.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/clones.h"
#include "cpu/words.h"
#include "relu_pool/relu_pool_math.h"
#include "relu_pool/relu_pool_ops.h"

namespace robust_ext {
namespace {

// v if `keep`, else +0: a bit mask, so the gradient scatter loops stay branch-free and vectorize.
template <typename W>
C10_ALWAYS_INLINE W keep_if(W v, bool keep) {
  using B = std::conditional_t<sizeof(W) == 8, uint64_t, std::conditional_t<sizeof(W) == 4, uint32_t, uint16_t>>;
  B bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= static_cast<B>(-static_cast<B>(keep));
  std::memcpy(&v, &bits, sizeof bits);
  return v;
}

// Both layouts run the window math as two passes over L1-sized buffers, each a loop GCC vectorizes
// (fused into one loop, the compare-and-select chain mixing float and byte lanes is not vectorized):
// columns() -- column() over pairs of input rows, unit stride; then combine() over adjacent columns.
// NCHW: an output row has only OW outputs (14 in the small CNN) with taps 2 apart; vector loops over
// such short strided rows ran slower than scalar code, and scalar code branches on the data. So NCHW
// goes by tiles of whole output rows: columns() per row, then pairs() over the whole tile.
constexpr int64_t kTile = 2048;  // column maxima per buffer

template <typename W, typename T>
C10_ALWAYS_INLINE void columns(const W* __restrict top, const W* __restrict bot, int64_t n, T* __restrict vm,
                               uint8_t* __restrict vb) {
  for (int64_t w = 0; w < n; ++w) {
    int bit;
    math::column(widen(top[w]), widen(bot[w]), vm[w], bit);
    vb[w] = static_cast<uint8_t>(bit);
  }
}

template <typename W, typename T>
C10_ALWAYS_INLINE void pairs(const T* __restrict vm, const uint8_t* __restrict vb, int64_t n, W* __restrict out,
                             uint8_t* __restrict code) {
  for (int64_t q = 0; q < n; ++q) {
    T v;
    math::combine(vm[2 * q], vb[2 * q], vm[2 * q + 1], vb[2 * q + 1], v, code[q]);
    out[q] = narrow_exact<W>(v);
  }
}

// channels_last: row (n, oh, ow) has C outputs; output j reads taps p[j], p[j + C] (top row) and
// p[j + W*C], p[j + W*C + C] (bottom row): the left and the right columns' maxima, then combine().
template <typename W>
RX_CLONES void forward_row_cl(const W* __restrict p, int64_t dx, int64_t dy, int64_t n, W* __restrict out,
                              uint8_t* __restrict code) {
  using T = decltype(widen(W()));
  T vl[kTile], vr[kTile];
  uint8_t bl[kTile], br[kTile];
  for (int64_t c0 = 0; c0 < n; c0 += kTile) {
    const int64_t len = std::min(kTile, n - c0);
    columns(p + c0, p + c0 + dy, len, vl, bl);
    columns(p + c0 + dx, p + c0 + dx + dy, len, vr, br);
    for (int64_t j = 0; j < len; ++j) {
      T v;
      math::combine(vl[j], bl[j], vr[j], br[j], v, code[c0 + j]);
      out[c0 + j] = narrow_exact<W>(v);
    }
  }
}

template <typename W>
RX_CLONES void backward_row_cl(const W* __restrict g, const uint8_t* __restrict code, int64_t n, int64_t dx,
                               int64_t dy, W* __restrict gi) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t k = code[j];
    const W v = g[j];
    gi[j] = keep_if(v, k == 0);
    gi[j + dx] = keep_if(v, k == 1);
    gi[j + dy] = keep_if(v, k == 2);
    gi[j + dx + dy] = keep_if(v, k == 3);
  }
}

// Output rows [r0, r1) of the NCHW plan: p points at the input, out/code at row r0's outputs.
template <typename W>
RX_CLONES void forward_tile_nchw(const W* __restrict p, const int64_t* __restrict row_in, int64_t rows,
                                 int64_t width, int64_t ow, W* __restrict out, uint8_t* __restrict code) {
  using T = decltype(widen(W()));
  T vm[kTile];
  uint8_t vb[kTile];
  const int64_t span = 2 * ow;
  for (int64_t r = 0; r < rows; ++r) {
    const W* top = p + row_in[r];
    columns(top, top + width, span, vm + r * span, vb + r * span);
  }
  pairs(vm, vb, rows * ow, out, code);
}

template <typename W>
RX_CLONES void backward_tile_nchw(const W* __restrict g, const uint8_t* __restrict code,
                                  const int64_t* __restrict row_in, int64_t rows, int64_t width, int64_t ow,
                                  W* __restrict gi) {
  W top[kTile], bot[kTile];
  for (int64_t q = 0; q < rows * ow; ++q) {
    const uint8_t k = code[q];
    const W v = g[q];
    top[2 * q] = keep_if(v, k == 0);
    top[2 * q + 1] = keep_if(v, k == 1);
    bot[2 * q] = keep_if(v, k == 2);
    bot[2 * q + 1] = keep_if(v, k == 3);
  }
  const int64_t span = 2 * ow;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(gi + row_in[r], top + r * span, span * sizeof(W));
    std::memcpy(gi + row_in[r] + width, bot + r * span, span * sizeof(W));
  }
}

// The layout both passes walk: `rows` rows of `per_row` outputs; a row is (n, c, oh) in NCHW with its
// outputs along ow, or (n, oh, ow) in channels_last with its outputs along c.
struct Plan {
  bool channels_last;
  int64_t N, C, H, W, OH, OW;
  int64_t rows() const { return channels_last ? N * OH * OW : N * C * OH; }
  int64_t per_row() const { return channels_last ? C : OW; }
  int64_t dx() const { return channels_last ? C : 1; }
  int64_t dy() const { return channels_last ? W * C : W; }
  // Offset of row r's first tap in the input.
  int64_t in_offset(int64_t r) const {
    if (channels_last) {
      const int64_t ow = r % OW, t = r / OW, oh = t % OH, n = t / OH;
      return ((n * H + 2 * oh) * W + 2 * ow) * C;
    }
    const int64_t oh = r % OH, nc = r / OH;
    return (nc * H + 2 * oh) * W;
  }
  // channels_last: f(in_offset, out_offset) per row. NCHW: f(row_in, rows, out_offset) per tile of rows,
  // row_in[i] the input offset of the tile's row i.
  template <typename F>
  void for_rows(F&& f) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row()));
    at::parallel_for(0, rows(), grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(in_offset(r), r * per_row());
    });
  }
  template <typename F>
  void for_tiles(F&& f) const {
    // f(row_in, rows, out_offset, n): rows whole output rows of n = OW outputs, or, for rows wider than
    // a tile, one segment of n outputs of one row.
    const int64_t seg = std::min(OW, kTile / 2), tile = std::max<int64_t>(1, kTile / (2 * OW));
    const int64_t grain = std::max<int64_t>(tile, 16384 / OW);
    at::parallel_for(0, rows(), grain, [&](int64_t b, int64_t e) {
      int64_t row_in[kTile];
      if (seg < OW) {
        for (int64_t r = b; r < e; ++r)
          for (int64_t c0 = 0; c0 < OW; c0 += seg) {
            row_in[0] = in_offset(r) + 2 * c0;
            f(row_in, int64_t{1}, r * OW + c0, std::min(seg, OW - c0));
          }
        return;
      }
      for (int64_t r = b; r < e; r += tile) {
        const int64_t n = std::min(tile, e - r);
        for (int64_t i = 0; i < n; ++i) row_in[i] = in_offset(r + i);
        f(row_in, n, r * OW, OW);
      }
    });
  }
};

Plan plan_for(const at::Tensor& t, bool channels_last, int64_t H, int64_t W) {
  return Plan{channels_last, t.size(0), t.size(1), H, W, H / 2, W / 2};
}

struct CpuKernels {
  static void forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& code, bool channels_last) {
    const int64_t W = x.size(3);
    const Plan plan = plan_for(x, channels_last, x.size(2), W);
    RX_DISPATCH_FLOATS(x.scalar_type(), "relu_max_pool2d", [&] {
      using Wd = typename Word<scalar_t>::type;
      const Wd* px = static_cast<const Wd*>(x.const_data_ptr());
      Wd* po = static_cast<Wd*>(out.data_ptr());
      uint8_t* pc = code.data_ptr<uint8_t>();
      if (plan.channels_last) {
        plan.for_rows([&](int64_t in, int64_t o) {
          forward_row_cl(px + in, plan.dx(), plan.dy(), plan.C, po + o, pc + o);
        });
      } else {
        plan.for_tiles([&](const int64_t* row_in, int64_t rows, int64_t o, int64_t n) {
          forward_tile_nchw(px, row_in, rows, W, n, po + o, pc + o);
        });
      }
    });
  }

  static void backward(const at::Tensor& g, const at::Tensor& c, const at::Tensor& gi, bool channels_last) {
    const int64_t in_w = gi.size(3);
    const Plan plan = plan_for(c, channels_last, gi.size(2), in_w);
    RX_DISPATCH_FLOATS(g.scalar_type(), "relu_max_pool2d_backward", [&] {
      using Wd = typename Word<scalar_t>::type;
      const Wd* pg = static_cast<const Wd*>(g.const_data_ptr());
      const uint8_t* pc = c.const_data_ptr<uint8_t>();
      Wd* pi = static_cast<Wd*>(gi.data_ptr());
      if (plan.channels_last) {
        plan.for_rows([&](int64_t in, int64_t o) {
          backward_row_cl(pg + o, pc + o, plan.C, plan.dx(), plan.dy(), pi + in);
        });
      } else {
        plan.for_tiles([&](const int64_t* row_in, int64_t rows, int64_t o, int64_t n) {
          backward_tile_nchw(pg + o, pc + o, row_in, rows, in_w, n, pi);
        });
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(robust_ext, CPU, m) {
  register_relu_pool_ops<CpuKernels>(m);
}

}  // namespace robust_ext
