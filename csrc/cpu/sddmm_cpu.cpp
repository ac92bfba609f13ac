// CPU SDDMM: out[e] = sum_n grad_out[n, row(e)] * x[n, col(e)], the gradient of spmm's values.
//
// Tokens are split into a fixed number of slabs (one per thread); each slab sums its tokens' share
// into its own accumulator row, and the slabs are added in a fixed order, so the result does not
// depend on scheduling. Inside a slab, tiles of kTile tokens of x and grad_out are staged transposed
// (tile.h): each nonzero is then a kTile-long dot product of two contiguous vectors.
//  - The nonzeros are visited in block order (blocked_order.h): by blocks of kBlockRows x kBlockCols,
//    so that a run of them reads a few KiB of the two staged tiles, from L1. In CSR order every row
//    sweeps the whole x tile (192 KiB for in = 768), from L2.
//  - Dot products are finished kLanes at a time: kLanes vectors of partial sums are folded into one
//    vector of kLanes totals (fold_lanes), instead of one horizontal sum per nonzero.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "blocked_order.h"
#include "cpu_isa.h"
#include "kept_orders.h"
#include "tile.h"

namespace sparseadapter {
namespace {

constexpr int64_t kTile = 64;       // tokens per tile
constexpr int64_t kBlockRows = 32;  // a block's rows of grad_out's tile: 8 KiB of float32
constexpr int64_t kBlockCols = 32;  // a block's columns of x's tile: 8 KiB of float32

// One level of fold_lanes: lane l of the result holds a[l & ~m] + a[l | m] where bit kBit of l is
// 0, b's where it is 1 (m = 1 << kBit).
template <int kBit, typename vec_t>
SA_ALWAYS_INLINE vec_t fold_pair(vec_t a, vec_t b) {
  using mask_t = decltype(a < b);
  constexpr int kN = sizeof(vec_t) / sizeof(a[0]);
  constexpr int kM = 1 << kBit;
  mask_t lo, hi;
  for (int l = 0; l < kN; ++l) {
    const int from_b = (l & kM) ? kN : 0;
    lo[l] = from_b + (l & ~kM);
    hi[l] = from_b + (l | kM);
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// v[0..kN) -> one vector whose lane j is the sum of v[j]'s lanes; v is overwritten. Each level
// pairs the vectors that differ in one index bit and keeps that bit in the lane index.
template <int kBit, typename vec_t>
SA_ALWAYS_INLINE void fold_levels(vec_t* v) {
  if constexpr (kBit >= 0) {
    constexpr int kHalf = 1 << kBit;
    for (int j = 0; j < kHalf; ++j) v[j] = fold_pair<kBit>(v[j], v[j + kHalf]);
    fold_levels<kBit - 1>(v);
  }
}

template <typename vec_t>
SA_ALWAYS_INLINE vec_t fold_lanes(vec_t* v) {
  constexpr int kN = sizeof(vec_t) / sizeof(v[0][0]);
  static_assert((kN & (kN - 1)) == 0, "lanes must be a power of two");
  fold_levels<__builtin_ctz(kN) - 1>(v);
  return v[0];
}

template <typename scalar_t, typename index_t>
struct SddmmArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* x;
  const int32_t* row;  // BlockedOrder
  const int32_t* col;
  acc_t* partial;  // [slabs, nnz_padded], entries in block order
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t nnz;
  int64_t nnz_padded;  // a whole number of vectors
  int64_t tiles_per_slab;
};

// Entry i's dot product over the tile's tokens, as one vector of partial sums. g holds the grad
// vectors of row g_row: consecutive entries mostly share their row.
template <int kTile, typename vec_t, typename scalar_t, typename index_t, typename acc_t>
SA_ALWAYS_INLINE vec_t entry_dot(
    const SddmmArgs<scalar_t, index_t>& a,
    int64_t i,
    const acc_t* xt,
    const acc_t* gt,
    vec_t* g,
    int32_t& g_row) {
  constexpr int kLanes = sizeof(vec_t) / sizeof(acc_t);
  constexpr int kVecs = kTile / kLanes;
  const int32_t r = a.row[i];
  if (r != g_row) {
    for (int v = 0; v < kVecs; ++v) g[v] = load_vec<vec_t>(gt + static_cast<int64_t>(r) * kTile + v * kLanes);
    g_row = r;
  }
  const acc_t* xc = xt + static_cast<int64_t>(a.col[i]) * kTile;
  vec_t dot = g[0] * load_vec<vec_t>(xc);
  for (int v = 1; v < kVecs; ++v) dot += g[v] * load_vec<vec_t>(xc + v * kLanes);
  return dot;
}

template <CpuIsa kIsa, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void sddmm_slabs(const SddmmArgs<scalar_t, index_t>& a, int64_t s_begin, int64_t s_end) {
  using acc_t = at::opmath_type<scalar_t>;
  // 32-byte vectors also in the AVX-512 variant: folding 16 zmm partial sums costs more shuffles
  // than the wider FMAs save (ymm measured 0.97x-1.22x as fast as zmm, median 1.15x, on AMD EPYC)
  constexpr CpuIsa kVecIsa = kIsa == CpuIsa::kAvx512 ? CpuIsa::kAvx2 : kIsa;
  using vec_t = typename Vec<kVecIsa, acc_t>::type;
  constexpr int kLanes = Vec<kVecIsa, acc_t>::kLanes;
  constexpr int kVecs = kTile / kLanes;

  std::vector<acc_t> xt(a.in_features * kTile + kLanes);
  std::vector<acc_t> gt(a.out_features * kTile + kLanes);
  const int64_t tiles = (a.num_tokens + kTile - 1) / kTile;
  for (int64_t s = s_begin; s < s_end; ++s) {
    acc_t* acc = a.partial + s * a.nnz_padded;
    const int64_t tile_end = std::min(tiles, (s + 1) * a.tiles_per_slab);
    for (int64_t tile = s * a.tiles_per_slab; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kTile;
      const int64_t nt = std::min(kTile, a.num_tokens - n0);
      load_transposed_tile<kIsa, kTile>(a.x + n0 * a.in_features, a.in_features, nt, a.in_features, xt.data());
      load_transposed_tile<kIsa, kTile>(
          a.grad_out + n0 * a.out_features, a.out_features, nt, a.out_features, gt.data());
      vec_t g[kVecs];
      int32_t g_row = -1;
      for (int64_t i0 = 0; i0 < a.nnz; i0 += kLanes) {
        vec_t dots[kLanes];
        if (i0 + kLanes <= a.nnz) {
#pragma GCC unroll 16
          for (int j = 0; j < kLanes; ++j) dots[j] = entry_dot<kTile, vec_t>(a, i0 + j, xt.data(), gt.data(), g, g_row);
        } else {
          for (int j = 0; j < kLanes; ++j) {
            dots[j] = i0 + j < a.nnz ? entry_dot<kTile, vec_t>(a, i0 + j, xt.data(), gt.data(), g, g_row) : vec_t{};
          }
        }
        store_vec(acc + i0, load_vec<vec_t>(acc + i0) + fold_lanes(dots));
      }
    }
  }
}

SA_DEFINE_ISA_VARIANTS(SddmmSlabs, sddmm_slabs);

template <typename scalar_t, typename index_t>
void run_sddmm(const SddmmInputs& in, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kLanes = kMaxLanes<acc_t>;  // padding for every variant's vectors
  const int64_t tiles = (in.num_tokens + kTile - 1) / kTile;
  // few tiles: CSR order (one block). Even with the order kept (kept_orders.h), block order was
  // slower here at 128-512 tokens at 90% sparsity and for 64 -> 768, faster only for 768 -> 64 at 50%.
  const bool blocks = tiles >= kMinTilesForBlocks;
  const auto kept = kept_entry_order<index_t>(
      in.crow_indices, in.col_indices, in.out_features, in.in_features, blocks ? kBlockRows : in.out_features,
      blocks ? kBlockCols : in.in_features);
  const BlockedOrder& order = *kept;
  const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  const int64_t nnz_padded = (in.nnz + kLanes - 1) / kLanes * kLanes;
  std::vector<acc_t> partial(slabs * nnz_padded, acc_t(0));

  SddmmArgs<scalar_t, index_t> a;
  a.grad_out = in.grad_out.const_data_ptr<scalar_t>();
  a.x = in.x.const_data_ptr<scalar_t>();
  a.row = order.row.data();
  a.col = order.col.data();
  a.partial = partial.data();
  a.num_tokens = in.num_tokens;
  a.in_features = in.in_features;
  a.out_features = in.out_features;
  a.nnz = in.nnz;
  a.nnz_padded = nnz_padded;
  a.tiles_per_slab = (tiles + slabs - 1) / slabs;

  SA_CPU_ISA_SWITCH(cpu_isa(), kIsa, [&] {
    at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) { SddmmSlabs<kIsa>::run(a, begin, end); });
  });

  // slabs added in a fixed order, entries scattered back to CSR order
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < in.nnz; ++i) {
    acc_t sum = partial[i];
    for (int64_t s = 1; s < slabs; ++s) sum += partial[s * nnz_padded + i];
    result[order.position[i]] = static_cast<scalar_t>(sum);
  }
}

}  // namespace

void sddmm_cpu_kernel(const SddmmInputs& in, at::Tensor& out) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(
      in.x.scalar_type(), in.crow_indices.scalar_type(), "sddmm_cpu", [&] { run_sddmm<scalar_t, index_t>(in, out); });
}

}  // namespace sparseadapter
