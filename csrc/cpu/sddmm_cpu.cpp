// CPU SDDMM: out[e] = sum_n grad_out[n, row(e)] * x[n, col(e)], the gradient of spmm's values.
//
// Tokens are split into a fixed number of slabs (one per thread); each slab sums its tokens' share
// into its own accumulator row, and the slabs are added in a fixed order, so the result does not
// depend on scheduling. Inside a slab, tiles of kTile tokens of x and grad_out are staged transposed
// (tile.h): each nonzero is then a kTile-long dot product of two contiguous vectors.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernels.h"
#include "cpu_isa.h"
#include "tile.h"

namespace sparseadapter {
namespace {

constexpr int64_t kTile = 64;  // tokens per tile

template <typename scalar_t, typename index_t>
struct SddmmArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* x;
  const index_t* crow;
  const index_t* col;
  acc_t* partial;  // [slabs, nnz]
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t nnz;
  int64_t tiles_per_slab;
};

template <CpuIsa kIsa, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void sddmm_slabs(const SddmmArgs<scalar_t, index_t>& a, int64_t s_begin, int64_t s_end) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = typename Vec64<acc_t>::type;
  constexpr int kLanes = Vec64<acc_t>::kLanes;
  constexpr int kVecs = kTile / kLanes;

  std::vector<acc_t> xt(a.in_features * kTile + kLanes);
  std::vector<acc_t> gt(a.out_features * kTile + kLanes);
  const int64_t tiles = (a.num_tokens + kTile - 1) / kTile;
  for (int64_t s = s_begin; s < s_end; ++s) {
    acc_t* acc = a.partial + s * a.nnz;
    const int64_t tile_end = std::min(tiles, (s + 1) * a.tiles_per_slab);
    for (int64_t tile = s * a.tiles_per_slab; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kTile;
      const int64_t nt = std::min(kTile, a.num_tokens - n0);
      load_transposed_tile<kIsa, kTile>(a.x + n0 * a.in_features, a.in_features, nt, a.in_features, xt.data());
      load_transposed_tile<kIsa, kTile>(
          a.grad_out + n0 * a.out_features, a.out_features, nt, a.out_features, gt.data());
      for (int64_t r = 0; r < a.out_features; ++r) {
        const int64_t e_begin = a.crow[r];
        const int64_t e_end = a.crow[r + 1];
        if (e_begin == e_end) {
          continue;
        }
        vec_t g[kVecs];
        for (int v = 0; v < kVecs; ++v) {
          g[v] = load_vec(gt.data() + r * kTile + v * kLanes);
        }
        for (int64_t e = e_begin; e < e_end; ++e) {
          const acc_t* xc = xt.data() + static_cast<int64_t>(a.col[e]) * kTile;
          vec_t dot = g[0] * load_vec(xc);
          for (int v = 1; v < kVecs; ++v) {
            dot += g[v] * load_vec(xc + v * kLanes);
          }
          acc_t sum = 0;
          for (int l = 0; l < kLanes; ++l) {
            sum += dot[l];
          }
          acc[e] += sum;
        }
      }
    }
  }
}

template <typename scalar_t, typename index_t>
SA_TARGET_AVX512 void sddmm_slabs_avx512(const SddmmArgs<scalar_t, index_t>& a, int64_t b, int64_t e) {
  sddmm_slabs<CpuIsa::kAvx512>(a, b, e);
}
template <typename scalar_t, typename index_t>
SA_TARGET_AVX2 void sddmm_slabs_avx2(const SddmmArgs<scalar_t, index_t>& a, int64_t b, int64_t e) {
  sddmm_slabs<CpuIsa::kAvx2>(a, b, e);
}
template <typename scalar_t, typename index_t>
void sddmm_slabs_baseline(const SddmmArgs<scalar_t, index_t>& a, int64_t b, int64_t e) {
  sddmm_slabs<CpuIsa::kBaseline>(a, b, e);
}

template <typename scalar_t, typename index_t>
void run_sddmm(const SddmmInputs& in, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles = (in.num_tokens + kTile - 1) / kTile;
  const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  at::Tensor partial = at::zeros({slabs, in.nnz}, in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));

  SddmmArgs<scalar_t, index_t> a;
  a.grad_out = in.grad_out.const_data_ptr<scalar_t>();
  a.x = in.x.const_data_ptr<scalar_t>();
  a.crow = in.crow_indices.const_data_ptr<index_t>();
  a.col = in.col_indices.const_data_ptr<index_t>();
  a.partial = partial.mutable_data_ptr<acc_t>();
  a.num_tokens = in.num_tokens;
  a.in_features = in.in_features;
  a.out_features = in.out_features;
  a.nnz = in.nnz;
  a.tiles_per_slab = (tiles + slabs - 1) / slabs;

  auto work = &sddmm_slabs_baseline<scalar_t, index_t>;
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: work = &sddmm_slabs_avx512<scalar_t, index_t>; break;
    case CpuIsa::kAvx2: work = &sddmm_slabs_avx2<scalar_t, index_t>; break;
    case CpuIsa::kBaseline: break;
  }
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) { work(a, begin, end); });
  out.copy_(slabs == 1 ? partial[0] : partial.sum(0));
}

}  // namespace

void sddmm_cpu_kernel(const SddmmInputs& in, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "sddmm_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(in.crow_indices.scalar_type(), "sddmm_cpu_index", [&] {
      run_sddmm<scalar_t, index_t>(in, out);
    });
  });
}

}  // namespace sparseadapter
