"""A short workout of every CUDA kernel path for compute-sanitizer (memcheck): odd sizes, empty rows,
nnz = 0, fully dense, one token, wide rows that take the fallback kernels, every dtype, on the sparse
path and on the dense path (expansion, gather, the tensor-core adapter: partial warp tiles; wider
bottlenecks on cuBLAS); the fused adapter (chunked and fallback plans); and the
pruning kernels (scores, exact-k selection with ties, mask to CSR)."""

import torch

import sparseadapter_ext as ops
from sparseadapter import SparseLinear

CASES = [
    (37, 53, 0.3, 71),
    (17, 23, 0.0, 9),
    (19, 21, 1.0, 35),
    (33, 65, 0.4, 1),
    (5, 4099, 0.05, 40),
    (64, 768, 0.1, 300),
]


def main():
    for mode in ("sparse", "dense"):  # auto adds only the event timer, which the CUDA tests run
        ops.set_path_mode(mode)
        products(torch.Generator().manual_seed(0))
    pruning(torch.Generator().manual_seed(1))
    torch.cuda.synchronize()
    print("memcheck workout done")


def products(gen):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for out_f, in_f, density, tokens in CASES:
            mask = torch.rand(out_f, in_f, generator=gen) < density
            layer = SparseLinear.from_dense(torch.randn(out_f, in_f, generator=gen), mask, torch.randn(out_f))
            layer = layer.to("cuda", dtype)
            x = torch.randn(tokens, in_f, generator=gen).to("cuda", dtype).requires_grad_()
            y = layer(x)
            y.backward(torch.randn_like(y))
            ops.sddmm(torch.randn_like(y), x.detach(), layer.crow_indices, layer.col_indices)
    # the fused adapter: partial tiles, chunked x and output (wide), the few-token fallback
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for tokens, d, r, density in (
            (70, 48, 16, 0.4),
            (40, 2000, 96, 0.05),
            (3, 40, 8, 0.5),
            (33, 17, 5, 1.0),
            (77, 96, 64, 0.3),
            (150, 256, 160, 0.2),
            (9, 64, 256, 0.3),
        ):
            layers = []
            for shape in ((r, d), (d, r)):
                mask = torch.rand(*shape, generator=gen) < density
                layers.append(SparseLinear.from_dense(torch.randn(*shape, generator=gen), mask, torch.randn(shape[0])))
            down, up = (layer.to("cuda", dtype).csr_buffers() for layer in layers)
            x = torch.randn(tokens, d, generator=gen).to("cuda", dtype).requires_grad_()
            for activation in ops.ADAPTER_ACTIVATIONS:
                out = ops.sparse_adapter(x, x, down, up, activation, 0.5)
            out.backward(torch.randn_like(out))


def pruning(gen):
    for dtype in (torch.float32, torch.float64):
        scores = [
            torch.randint(0, 5, shape, generator=gen).to("cuda", dtype) for shape in ((37, 53), (0, 4), (64, 768))
        ]
        total = sum(s.numel() for s in scores)
        for k in (0, 1, total // 3, total):
            masks = ops.topk_masks(scores, k)
            mask = masks[2]
            ops.mask_to_csr(mask, torch.int32)
        w = torch.randn(33, 65, generator=gen).to("cuda", dtype)
        for method, g, hg in (("magnitude", None, None), ("snip", w, None), ("grasp", None, w), ("synflow", w, None)):
            ops.prune_score(w, g, hg, method)


if __name__ == "__main__":
    main()
