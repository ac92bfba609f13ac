"""Benchmarks that ship with the package, so `sparseadapter bench` runs them on any install.

linear    SparseLinear vs dense F.linear and torch.sparse CSR (forward, forward+backward)
adapter   the whole bottleneck adapter: fused sparse kernel vs layer by layer vs masked dense vs
          a dense adapter with the same weight count
pruning   the fused pruning kernels vs the plain PyTorch way
serving   sentences/s of a MiniLM classifier with sparse adapters: Python eager and C++ TorchScript
training  one training step (MiniLM on CPU, BERT-base on CUDA): full fine-tuning, peft LoRA and our
          dense and sparse adapters, per precision; time, trainable parameters, memory, kernel paths
calibrate where the sparse kernel and a dense GEMM cross (the table behind path="auto")
decode    tokens/s of a causal LM decoding with the KV cache: the base model, our sparse and dense
          adapters, peft LoRA and merged LoRA, at batch 1 and 16

Every suite prints its metadata lines and tables (table.py), and takes --record FILE to save them as a
result record (record.py), the source BENCHMARKS.md is rendered from (scripts/render_benchmarks.py).
"""

from importlib import import_module

SUITES = {
    "linear": "sparse_linear",
    "adapter": "adapter",
    "pruning": "pruning",
    "calibrate": "calibrate",
    "serving": "serving",
    "training": "training",
    "decode": "decode",
}


def run_suite(name: str, argv=None) -> int:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(SUITES)}")
    return import_module(f".{SUITES[name]}", __name__).main(argv)
