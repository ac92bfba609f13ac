"""What scripts/install.sh may skip: the pip installs and the extension build, each recorded in a stamp.

    build_state.py deps check|record --venv DIR -- SPEC...
        check exits 0 when DIR's stamp matches SPEC... (the pip requirement strings install.sh passes),
        the project table of pyproject.toml, setup.py and the Python version; 1 when pip must run.
    build_state.py extension status|record
        status prints `current` (nothing to build), `changed` (sources changed: build, and ninja
        recompiles only what changed in the persistent build folder) or `toolchain` (the compiler
        inputs that ninja cannot see changed, e.g. the torch in the environment: build from a clean
        folder). record writes the stamp after a successful build.

Standard library only, and torch is never imported: the check runs before torch is installed and in
well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS_STAMP = ".sparseadapter-deps.json"  # inside the virtual environment: a new venv starts without one
EXTENSION_STAMP = Path("build") / "sparseadapter-extension.json"  # beside the objects it describes
# Environment variables that change what setup.py compiles or with which compiler.
BUILD_ENV = ("FORCE_CUDA", "FORCE_CPU", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "CC", "CXX", "PYTORCH_NVCC")
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(data)
    return h.hexdigest()


def _project_table(pyproject: Path) -> str:
    """The [project] table (name, dependencies, extras, scripts) as canonical JSON, so that tool
    settings elsewhere in pyproject.toml do not force a reinstall. Without tomllib (Python 3.10), the
    whole file."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:
        return text
    return json.dumps(tomllib.loads(text).get("project", {}), sort_keys=True)


def deps_key(root: Path, specs: list[str]) -> str:
    return _digest(
        [sys.version, *specs, "--", _project_table(root / "pyproject.toml"), (root / "setup.py").read_bytes()]
    )


def extension_sources(root: Path) -> list[Path]:
    """Every input file of the compiled extension: the C++/CUDA sources and headers, setup.py, and
    VERSION (compiled into the library)."""
    files = [p for p in (root / "csrc").rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES]
    files += [p for p in (root / "setup.py", root / "VERSION") if p.is_file()]
    return sorted(files)


def toolchain_key() -> str:
    """What ninja's dependency files do not track: the Python and torch the build compiles against and
    the build's environment variables."""
    try:
        torch = importlib.metadata.distribution("torch")
        torch_id = (torch.version, str(torch.locate_file("torch")))
    except importlib.metadata.PackageNotFoundError:
        torch_id = ("no torch",)
    return _digest(
        [
            sys.version,
            sys.executable,
            sysconfig.get_platform(),
            *torch_id,
            *(f"{name}={os.environ.get(name, '')}" for name in BUILD_ENV),
        ]
    )


def sources_key(root: Path) -> str:
    return _digest(part for p in extension_sources(root) for part in (p.relative_to(root).as_posix(), p.read_bytes()))


def built_library(root: Path) -> list[Path]:
    return sorted((root / "sparseadapter_ext").glob("_C*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")))


def extension_status(root: Path) -> str:
    stamp = root / EXTENSION_STAMP
    if not stamp.is_file() or not built_library(root):
        return "toolchain" if not stamp.is_file() else "changed"
    recorded = json.loads(stamp.read_text(encoding="utf-8"))
    if recorded.get("toolchain") != toolchain_key():
        return "toolchain"
    return "current" if recorded.get("sources") == sources_key(root) else "changed"


def record_extension(root: Path) -> None:
    if not built_library(root):
        raise SystemExit(f"build_state: no compiled library in {root / 'sparseadapter_ext'}; the build failed")
    _write_json(root / EXTENSION_STAMP, {"toolchain": toolchain_key(), "sources": sources_key(root)})


def deps_current(venv: Path, root: Path, specs: list[str]) -> bool:
    stamp = venv / DEPS_STAMP
    if not stamp.is_file():
        return False
    return json.loads(stamp.read_text(encoding="utf-8")).get("deps") == deps_key(root, specs)


def record_deps(venv: Path, root: Path, specs: list[str]) -> None:
    _write_json(venv / DEPS_STAMP, {"deps": deps_key(root, specs), "specs": specs})


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    deps = sub.add_parser("deps", help="the pip installs")
    deps.add_argument("action", choices=("check", "record"))
    deps.add_argument("--venv", type=Path, required=True)
    deps.add_argument("specs", nargs="+", help="the requirement strings install.sh passes to pip")
    ext = sub.add_parser("extension", help="the compiled extension")
    ext.add_argument("action", choices=("status", "record"))
    args = parser.parse_args(argv)
    if args.what == "deps":
        if args.action == "record":
            record_deps(args.venv, ROOT, args.specs)
            return 0
        return 0 if deps_current(args.venv, ROOT, args.specs) else 1
    if args.action == "record":
        record_extension(ROOT)
    else:
        print(extension_status(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
