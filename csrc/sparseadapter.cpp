// Operator schemas of the `sparseadapter` namespace: the one place they are defined.
//
// A sparse weight W has the shape of an nn.Linear weight, [out_features, in_features], stored as CSR
// over its rows (crow_indices: out_features + 1, col_indices: nnz, values: nnz). spmm, sddmm,
// sparse_linear, sparse_adapter and their backward ops run the path chosen for each problem
// (csrc/path_choice.h): our CSR kernels, or W expanded per call into a dense scratch (csr_to_dense)
// and the vendor GEMM. Parameters and gradients stay nnz-sized on both.
//
// Back ends register kernels in csrc/cpu/register_cpu.cpp and csrc/cuda/register_cuda.cpp; the
// pattern-only ops are device-agnostic ATen code in csrc/pattern.cpp. Fake kernels and autograd are
// registered from Python (sparseadapter_ext/ops.py), following pytorch/extension-cpp.
#include <torch/library.h>

TORCH_LIBRARY(sparseadapter, m) {
  // y[..., r] = bias[r] + sum_{e in row r} values[e] * x[..., col_indices[e]]   (y = x @ W.T + b).
  // row_order, if given, is a permutation of the rows (longest first) used by the CUDA kernel to
  // balance work; it never changes the result.
  m.def(
      "spmm(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
      "Tensor? row_order=None, Tensor? bias=None) -> Tensor");

  // Sampled dense-dense product: out[e] = sum_n grad_out[n, row(e)] * x[n, col_indices[e]], summed
  // over all leading dims n. This is the gradient of spmm with respect to `values`.
  m.def("sddmm(Tensor grad_out, Tensor x, Tensor crow_indices, Tensor col_indices) -> Tensor");

  // The transposed pattern: CSR of W.T ([num_cols, num_rows]) plus perm, so that
  // values_t = values[perm]. Pattern-only: computed once per pattern, kept as buffers.
  m.def(
      "csr_transpose(Tensor crow_indices, Tensor col_indices, SymInt num_cols) "
      "-> (Tensor crow_indices_t, Tensor col_indices_t, Tensor perm)");

  // Rows sorted by decreasing nnz (stable): the load-balancing order for spmm. Pattern-only.
  m.def("csr_row_order(Tensor crow_indices) -> Tensor");

  // The dense weight of a CSR pattern: dense[r, col_indices[e]] = values[e] for the entries e of row
  // r, zeros elsewhere; [crow_indices.numel() - 1, num_cols] in values' dtype. One kernel, no ATen
  // index ops: the "dense" path expands the weight per call into this scratch and runs a dense GEMM.
  m.def("csr_to_dense(Tensor values, Tensor crow_indices, Tensor col_indices, SymInt num_cols) -> Tensor");

  // The transpose of csr_to_dense: values[e] = dense[row(e), col_indices[e]] (the entries of a dense
  // matrix at the pattern). The dense path's weight gradient: a dense product gathered at the pattern.
  m.def("csr_gather(Tensor dense, Tensor crow_indices, Tensor col_indices) -> Tensor");

  // The O(nnz) structural check of a CSR pattern of shape [num_rows, num_cols]; raises ValueError
  // naming the first problem found. Run at construction and on explicit request, not per call.
  m.def("validate_csr(Tensor crow_indices, Tensor col_indices, SymInt num_rows, SymInt num_cols) -> ()");

  // The differentiable sparse linear layer: spmm plus everything its backward needs (the transposed
  // pattern and both row orders), so that autograd works under torch.compile and torch.export.
  m.def(
      "sparse_linear(Tensor x, Tensor values, Tensor? bias, Tensor crow_indices, Tensor col_indices, "
      "Tensor row_order, Tensor crow_indices_t, Tensor col_indices_t, Tensor perm_t, "
      "Tensor row_order_t) -> Tensor");

  // sparse_linear's forward in eager training: y, and, when keep_weight and the problem ran on the dense
  // path, W as that path expanded it ([out_features, in_features], a scratch of the call), else an
  // empty tensor. Handing it to sparse_linear_backward spares grad_x a second expansion. No autograd
  // of its own: the eager autograd function of sparse_linear (sparseadapter_ext/ops.py) calls it.
  m.def(
      "sparse_linear_forward(Tensor x, Tensor values, Tensor? bias, Tensor crow_indices, Tensor col_indices, "
      "Tensor row_order, Tensor crow_indices_t, Tensor col_indices_t, Tensor perm_t, Tensor row_order_t, "
      "bool keep_weight) -> (Tensor y, Tensor weight)");

  // sparse_linear's backward in one call: grad_x = grad_y @ W through the transposed pattern, the
  // values' gradient by SDDMM (x needed), the bias's by a sum over the leading dims; each computed
  // only where output_mask says so (else an empty tensor). values is needed for grad_x only. weight,
  // when given and not empty, is W as sparse_linear_forward expanded it: grad_x's dense path uses it.
  m.def(
      "sparse_linear_backward(Tensor grad_y, Tensor? x, Tensor? values, Tensor crow_indices, "
      "Tensor col_indices, Tensor crow_indices_t, Tensor col_indices_t, Tensor perm_t, Tensor row_order_t, "
      "bool[3] output_mask, Tensor? weight=None) -> (Tensor grad_x, Tensor grad_values, Tensor grad_bias)");

  // The whole bottleneck adapter, with D [bottleneck, in] and U [out, bottleneck] in CSR:
  //   hidden_pre = x @ D.T + down_bias,  out = residual + scale * (act(hidden_pre) @ U.T + up_bias)
  // activation: identity, relu, gelu (erf), silu or tanh; residual optional, of out's shape. CPU runs
  // it in one pass that keeps the bottleneck on chip. hidden_pre is returned when save_hidden (the
  // backward needs it), else an empty tensor. The transposed patterns and their row orders are the
  // backward's, as in sparse_linear.
  m.def(
      "sparse_adapter(Tensor x, Tensor? residual, "
      "Tensor down_values, Tensor? down_bias, Tensor down_crow_indices, Tensor down_col_indices, "
      "Tensor down_crow_indices_t, Tensor down_col_indices_t, Tensor down_perm_t, Tensor down_row_order_t, "
      "Tensor up_values, Tensor? up_bias, Tensor up_crow_indices, Tensor up_col_indices, "
      "Tensor up_crow_indices_t, Tensor up_col_indices_t, Tensor up_perm_t, Tensor up_row_order_t, "
      "str activation, float scale, bool save_hidden) -> (Tensor out, Tensor hidden_pre)");

  // sparse_adapter at inference: the same out from the forward tensors only (no transposed patterns,
  // no hidden_pre), so that a call with one token converts and checks 8 tensors instead of 18. It has
  // no autograd: a call that needs a gradient is an error (use sparse_adapter).
  m.def(
      "sparse_adapter_infer(Tensor x, Tensor? residual, "
      "Tensor down_values, Tensor? down_bias, Tensor down_crow_indices, Tensor down_col_indices, "
      "Tensor up_values, Tensor? up_bias, Tensor up_crow_indices, Tensor up_col_indices, "
      "str activation, float scale) -> Tensor");

  // sparse_adapter's backward in one call, from out's gradient, x and the saved pre-activation:
  // the gradients of x, down's values and bias, up's values and bias, in that order, each computed
  // only where output_mask says so (else an empty tensor). The residual's gradient is grad_out itself.
  m.def(
      "sparse_adapter_backward(Tensor grad_out, Tensor x, Tensor hidden_pre, "
      "Tensor down_values, Tensor down_crow_indices, Tensor down_col_indices, "
      "Tensor down_crow_indices_t, Tensor down_col_indices_t, Tensor down_perm_t, Tensor down_row_order_t, "
      "Tensor up_values, Tensor up_crow_indices, Tensor up_col_indices, "
      "Tensor up_crow_indices_t, Tensor up_col_indices_t, Tensor up_perm_t, Tensor up_row_order_t, "
      "str activation, float scale, bool[5] output_mask) -> (Tensor grad_x, Tensor grad_down_values, "
      "Tensor grad_down_bias, Tensor grad_up_values, Tensor grad_up_bias)");

  // Several bottleneck adapters in one batch, one adapter per row (mixed-adapter batches): row r of x
  // ([rows, ..., in]; its tokens are x[r]) runs adapter adapter_index[r] as sparse_adapter runs it alone,
  // and a row with adapter_index -1 gets the residual (zeros without one). adapter_index: int32 or
  // int64, [rows], on the CPU or on x's device (it is read on the host: on CUDA, one synchronizing copy).
  // The K adapters' arrays are concatenated, adapter k's after adapter k-1's, each adapter's crow_indices
  // starting at 0 over its own entries: down_values / down_col_indices: sum(down_nnz) entries,
  // down_crow_indices: sum(bottleneck + 1), down_bias: sum(bottleneck); up_values / up_col_indices:
  // sum(up_nnz), up_crow_indices: K * (out_features + 1), up_bias: K * out_features. The lists give the
  // sizes per adapter; scale is per adapter too, and so is activation, one name per adapter separated
  // by commas ("relu,gelu"; LoRA is "identity" with no biases and scale alpha / r). The rows are
  // grouped by adapter inside the op (stably), each group running its adapter's fused kernel or dense
  // path (the path chosen for that problem) on its tokens as one block: slices of x when each
  // adapter's rows are consecutive, else x gathered into adapter order once and the output scattered
  // back once.
  // hidden_pre (when save_hidden) is the backward's state: [tokens, max(bottleneck)] holding the groups'
  // pre-activations one after another (adapter 0's rows first), each group a [tokens_k, bottleneck_k]
  // block. The transposed patterns, concatenated the same way (down: K * (in + 1) crow_t, sum(down_nnz)
  // col_t and perm_t (indices into the adapter's own entries), K * in row_order_t; up: sum(bottleneck + 1)
  // crow_t, sum(up_nnz) col_t and perm_t, sum(bottleneck) row_order_t), are the backward's only: all
  // eight or none (inference needs none).
  m.def(
      "sparse_adapter_multi(Tensor x, Tensor adapter_index, Tensor? residual, "
      "Tensor down_values, Tensor? down_bias, Tensor down_crow_indices, Tensor down_col_indices, "
      "Tensor up_values, Tensor? up_bias, Tensor up_crow_indices, Tensor up_col_indices, "
      "int[] bottleneck, int[] down_nnz, int[] up_nnz, int out_features, str activation, float[] scale, "
      "bool save_hidden, "
      "Tensor? down_crow_indices_t=None, Tensor? down_col_indices_t=None, Tensor? down_perm_t=None, "
      "Tensor? down_row_order_t=None, Tensor? up_crow_indices_t=None, Tensor? up_col_indices_t=None, "
      "Tensor? up_perm_t=None, Tensor? up_row_order_t=None) -> (Tensor out, Tensor hidden_pre)");

  // sparse_adapter_multi's backward in one call: the gradients of x (zero in rows without an adapter),
  // of the concatenated down values and biases and up values and biases (zero for an adapter without
  // rows), each only where output_mask says so (else an empty tensor). Biases' gradients come for
  // every adapter (sum(bottleneck), K * out_features entries), whether or not it has biases.
  m.def(
      "sparse_adapter_multi_backward(Tensor grad_out, Tensor x, Tensor adapter_index, Tensor hidden_pre, "
      "Tensor down_values, Tensor down_crow_indices, Tensor down_col_indices, "
      "Tensor down_crow_indices_t, Tensor down_col_indices_t, Tensor down_perm_t, Tensor down_row_order_t, "
      "Tensor up_values, Tensor up_crow_indices, Tensor up_col_indices, "
      "Tensor up_crow_indices_t, Tensor up_col_indices_t, Tensor up_perm_t, Tensor up_row_order_t, "
      "int[] bottleneck, int[] down_nnz, int[] up_nnz, int out_features, str activation, float[] scale, "
      "bool[5] output_mask) -> (Tensor grad_x, Tensor grad_down_values, Tensor grad_down_bias, "
      "Tensor grad_up_values, Tensor grad_up_bias)");

  // Pruning at initialization; kernels in csrc/cpu/prune_cpu.cpp and csrc/cuda/prune_cuda.cu.

  // The keep-score of every weight (higher = keep), in one pass: "magnitude" |w|, "snip" |g * w|
  // (g = dL/dw), "grasp" w * Hg (keeping the highest w * Hg removes the highest GraSP
  // S = -w * Hg), "synflow" |w * g| (g = dR/dw). float32 out for float32/16/bf16, float64 for float64.
  m.def("prune_score(Tensor weight, Tensor? grad, Tensor? hess_grad, str method) -> Tensor");

  // Exact-k global selection over many tensors without concatenating them (radix select): bool masks
  // of the scores' shapes with exactly k True in total, the k highest scores; among equal scores the
  // entry first in (list order, flat row-major index) is kept. NaN or k outside [0, total] raises.
  m.def("topk_masks(Tensor[] scores, SymInt k) -> Tensor[]");

  // CSR of the True entries of a 2-D mask on its device, columns sorted within rows, indices of
  // index_dtype (int32 or int64): the same arrays as python/sparseadapter/csr.py mask_to_csr.
  m.def("mask_to_csr(Tensor mask, ScalarType index_dtype) -> (Tensor crow_indices, Tensor col_indices)");
}
