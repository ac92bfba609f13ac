// CPU kernels of the pruning ops (csrc/prune.h): fused score, exact-k radix select over many tensors,
// mask -> CSR. Every loop is split with at::parallel_for; the results never depend on the number of
// threads (histograms are integer counts; tie ranks come from a scan in a fixed order).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "../prune.h"

namespace sparseadapter {
namespace {

using namespace prune;

constexpr int64_t kElementwiseGrain = 1 << 15;
constexpr int64_t kBlock = 256;         // keys computed per vectorizable block before histogramming
constexpr int64_t kTieChunk = 1 << 16;  // fixed chunks of the tie-rank scan

// ---------------------------------------------------------------------------------------------
// prune_score

template <Method kMethod, typename scalar_t, typename out_t>
void score_loop(const ScoreInputs& in, at::Tensor& out) {
  const scalar_t* w = in.weight.const_data_ptr<scalar_t>();
  const scalar_t* g = in.grad.defined() ? in.grad.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* hg = in.hess_grad.defined() ? in.hess_grad.const_data_ptr<scalar_t>() : nullptr;
  out_t* o = out.data_ptr<out_t>();
  at::parallel_for(0, in.weight.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
    // Branch-free bodies per method so the compiler vectorizes them; unused operands are not read.
    for (int64_t i = begin; i < end; ++i) {
      const out_t wi = static_cast<out_t>(w[i]);
      if constexpr (kMethod == Method::kMagnitude) {
        o[i] = score_of<kMethod, out_t>(wi, out_t(0), out_t(0));
      } else if constexpr (kMethod == Method::kGrasp) {
        o[i] = score_of<kMethod, out_t>(wi, out_t(0), static_cast<out_t>(hg[i]));
      } else {
        o[i] = score_of<kMethod, out_t>(wi, static_cast<out_t>(g[i]), out_t(0));
      }
    }
  });
}

template <typename scalar_t, typename out_t>
void score_dispatch(const ScoreInputs& in, at::Tensor& out) {
  switch (in.method) {
    case Method::kMagnitude: return score_loop<Method::kMagnitude, scalar_t, out_t>(in, out);
    case Method::kSnip: return score_loop<Method::kSnip, scalar_t, out_t>(in, out);
    case Method::kGrasp: return score_loop<Method::kGrasp, scalar_t, out_t>(in, out);
    case Method::kSynflow: return score_loop<Method::kSynflow, scalar_t, out_t>(in, out);
  }
}

// ---------------------------------------------------------------------------------------------
// topk_masks

template <typename scalar_t>
void check_no_nan(const TopkInputs& in) {
  for (size_t t = 0; t < in.scores.size(); ++t) {
    const scalar_t* s = in.scores[t].const_data_ptr<scalar_t>();
    const int64_t n = in.scores[t].numel();
    const int64_t nans = at::parallel_reduce(
        0, n, kElementwiseGrain, int64_t(0),
        [&](int64_t b, int64_t e, int64_t acc) {
          for (int64_t i = b; i < e; ++i) acc += s[i] != s[i];
          return acc;
        },
        std::plus<int64_t>());
    if (nans) fail_nan(t, nans);
  }
}

// One histogram pass over all tensors: per-thread histograms, summed in thread order at the end.
// Pass 0 takes every key (mask 0) and also counts NaNs, so NaN costs no extra pass.
template <typename scalar_t>
void histogram_pass(
    const TopkInputs& in,
    typename KeyOf<scalar_t>::type prefix,
    typename KeyOf<scalar_t>::type mask,
    int shift,
    int pass,
    int64_t* counts) {
  using key_t = typename KeyOf<scalar_t>::type;
  const int threads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(threads) * kBins, 0);
  std::vector<int64_t> nans(static_cast<size_t>(threads) * in.scores.size(), 0);
  for (size_t t = 0; t < in.scores.size(); ++t) {
    const scalar_t* s = in.scores[t].const_data_ptr<scalar_t>();
    at::parallel_for(0, in.scores[t].numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      int64_t* h = hist.data() + static_cast<size_t>(tid) * kBins;
      // Four sub-histograms break the store-to-load chains of runs of equal digits.
      int64_t local[4][kBins] = {};
      key_t keys[kBlock];
      int64_t nan_count = 0;
      for (int64_t b = begin; b < end; b += kBlock) {
        const int64_t len = std::min(kBlock, end - b);
        for (int64_t i = 0; i < len; ++i) keys[i] = float_key(s[b + i]);  // vectorizable
        if (pass == 0) {
          for (int64_t i = 0; i < len; ++i) nan_count += s[b + i] != s[b + i];
          int64_t i = 0;
          for (; i + 4 <= len; i += 4) {
            ++local[0][keys[i] >> shift];
            ++local[1][keys[i + 1] >> shift];
            ++local[2][keys[i + 2] >> shift];
            ++local[3][keys[i + 3] >> shift];
          }
          for (; i < len; ++i) ++local[0][keys[i] >> shift];
        } else {
          for (int64_t i = 0; i < len; ++i) {
            const key_t key = keys[i];
            if ((key & mask) == prefix) ++local[i & 3][(key >> shift) & (kBins - 1)];
          }
        }
      }
      for (int d = 0; d < kBins; ++d) h[d] += local[0][d] + local[1][d] + local[2][d] + local[3][d];
      nans[static_cast<size_t>(tid) * in.scores.size() + t] += nan_count;
    });
  }
  if (pass == 0) {
    for (size_t t = 0; t < in.scores.size(); ++t) {
      int64_t n = 0;
      for (int tid = 0; tid < threads; ++tid) n += nans[static_cast<size_t>(tid) * in.scores.size() + t];
      if (n) fail_nan(t, n);
    }
  }
  for (int tid = 0; tid < threads; ++tid) {
    for (int d = 0; d < kBins; ++d) counts[d] += hist[static_cast<size_t>(tid) * kBins + d];
  }
}

// mask = key > T, plus the first `ties_kept` entries with key == T in (list, flat index) order.
template <typename scalar_t>
void mask_pass(
    const TopkInputs& in,
    const Threshold<typename KeyOf<scalar_t>::type>& th,
    std::vector<at::Tensor>& masks) {
  using key_t = typename KeyOf<scalar_t>::type;
  const key_t T = th.key;
  if (th.ties_kept == th.ties_total) {  // every tie is kept: a plain comparison, no ranks needed
    for (size_t t = 0; t < in.scores.size(); ++t) {
      const scalar_t* s = in.scores[t].const_data_ptr<scalar_t>();
      bool* m = masks[t].data_ptr<bool>();
      at::parallel_for(0, in.scores[t].numel(), kElementwiseGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) m[i] = float_key(s[i]) >= T;
      });
    }
    return;
  }
  // Ties at the threshold, counted per fixed chunk, then ranked by an exclusive scan in list order.
  std::vector<int64_t> chunk_start(in.scores.size() + 1, 0);
  for (size_t t = 0; t < in.scores.size(); ++t) {
    chunk_start[t + 1] = chunk_start[t] + (in.scores[t].numel() + kTieChunk - 1) / kTieChunk;
  }
  std::vector<int64_t> ties(chunk_start.back() + 1, 0);
  for (size_t t = 0; t < in.scores.size(); ++t) {
    const scalar_t* s = in.scores[t].const_data_ptr<scalar_t>();
    bool* m = masks[t].data_ptr<bool>();
    const int64_t n = in.scores[t].numel();
    const int64_t chunks = chunk_start[t + 1] - chunk_start[t];
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = c * kTieChunk, e = std::min(n, b + kTieChunk);
        int64_t eq = 0;
        for (int64_t i = b; i < e; ++i) {
          const key_t key = float_key(s[i]);
          m[i] = key > T;
          eq += key == T;
        }
        ties[chunk_start[t] + c] = eq;
      }
    });
  }
  int64_t running = 0;
  for (auto& c : ties) {
    const int64_t eq = c;
    c = running;
    running += eq;
  }
  for (size_t t = 0; t < in.scores.size(); ++t) {
    const scalar_t* s = in.scores[t].const_data_ptr<scalar_t>();
    bool* m = masks[t].data_ptr<bool>();
    const int64_t n = in.scores[t].numel();
    const int64_t chunks = chunk_start[t + 1] - chunk_start[t];
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        int64_t rank = ties[chunk_start[t] + c];
        if (rank >= th.ties_kept) continue;  // this chunk's ties all come too late
        const int64_t b = c * kTieChunk, e = std::min(n, b + kTieChunk);
        for (int64_t i = b; i < e && rank < th.ties_kept; ++i) {
          if (float_key(s[i]) == T) {
            m[i] = true;
            ++rank;
          }
        }
      }
    });
  }
}

template <typename scalar_t>
void topk_impl(const TopkInputs& in, std::vector<at::Tensor>& masks) {
  using key_t = typename KeyOf<scalar_t>::type;
  if (in.k == 0 || in.k == in.total) {
    check_no_nan<scalar_t>(in);
    for (auto& m : masks) m.fill_(in.k != 0);
    return;
  }
  const auto th = radix_select<key_t>(in.k, [&](key_t prefix, key_t mask, int shift, int pass, int64_t* counts) {
    histogram_pass<scalar_t>(in, prefix, mask, shift, pass, counts);
  });
  mask_pass<scalar_t>(in, th, masks);
}

// ---------------------------------------------------------------------------------------------
// mask_to_csr

template <typename index_t>
void fill_csr(
    const bool* m,
    int64_t rows,
    int64_t cols,
    const std::vector<int64_t>& start,
    index_t* crow,
    index_t* col) {
  for (int64_t r = 0; r <= rows; ++r) crow[r] = static_cast<index_t>(start[r]);
  at::parallel_for(
      0, rows, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(cols, 1)), [&](int64_t rb, int64_t re) {
        // Branch-free compaction into a private row buffer (one spare slot: every column is written,
        // only set ones advance), then a copy: random masks would mispredict a branch per column.
        std::vector<index_t> buffer(cols + 1);
        for (int64_t r = rb; r < re; ++r) {
          const uint8_t* row = reinterpret_cast<const uint8_t*>(m + r * cols);
          const int64_t count = start[r + 1] - start[r];
          index_t* out = col + start[r];
          if (count == cols) {  // a full row: no test per column
            for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<index_t>(j);
            continue;
          }
          int64_t pos = 0;
          for (int64_t j = 0; j < cols; ++j) {
            buffer[pos] = static_cast<index_t>(j);
            pos += row[j];
          }
          std::copy(buffer.begin(), buffer.begin() + count, out);
        }
      });
}

}  // namespace

at::Tensor prune_score_cpu(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    c10::string_view method) {
  const auto in = check_score_inputs(weight, grad, hess_grad, std::string(method), c10::DeviceType::CPU);
  auto out = at::empty(in.weight.sizes(), in.weight.options().dtype(in.out_dtype));
  if (out.numel() == 0) return out;
  SA_DISPATCH_VALUE_TYPES(in.weight.scalar_type(), "prune_score_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      score_dispatch<scalar_t, double>(in, out);
    } else {
      score_dispatch<scalar_t, float>(in, out);
    }
  });
  return out;
}

std::vector<at::Tensor> topk_masks_cpu(at::TensorList scores, c10::SymInt k_sym) {
  const auto in = check_topk_inputs(scores, k_sym.guard_int(__FILE__, __LINE__), c10::DeviceType::CPU);
  std::vector<at::Tensor> masks;
  masks.reserve(in.scores.size());
  for (const auto& s : in.scores) masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  if (in.scores.empty()) return masks;
  if (in.dtype == at::kDouble) {
    topk_impl<double>(in, masks);
  } else {
    topk_impl<float>(in, masks);
  }
  return masks;
}

std::tuple<at::Tensor, at::Tensor> mask_to_csr_cpu(const at::Tensor& mask_in, at::ScalarType index_dtype) {
  const auto mask = check_mask_inputs(mask_in, index_dtype, c10::DeviceType::CPU);
  const int64_t rows = mask.size(0), cols = mask.size(1);
  const bool* m = mask.const_data_ptr<bool>();
  // Row counts (bytes summed: vectorizable), then an exclusive scan into row starts.
  std::vector<int64_t> start(rows + 1, 0);
  at::parallel_for(
      0, rows, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(cols, 1)), [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const uint8_t* row = reinterpret_cast<const uint8_t*>(m + r * cols);
          int64_t count = 0;
          for (int64_t j = 0; j < cols; ++j) count += row[j];
          start[r + 1] = count;
        }
      });
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  const int64_t nnz = start[rows];
  check_nnz_fits(nnz, index_dtype);
  auto crow = at::empty({rows + 1}, mask.options().dtype(index_dtype));
  auto col = at::empty({nnz}, mask.options().dtype(index_dtype));
  SA_DISPATCH_INDEX_TYPES(index_dtype, "mask_to_csr_cpu", [&] {
    fill_csr<index_t>(m, rows, cols, start, crow.data_ptr<index_t>(), col.data_ptr<index_t>());
  });
  return {crow, col};
}

}  // namespace sparseadapter
