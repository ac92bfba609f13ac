"""scripts/build_state.py, the stamps that let scripts/install.sh skip pip and the extension build: a
changed source, header, setup.py, torch or build variable is seen; an unchanged tree is `current`."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from repo_paths import REPO

SCRIPT = REPO / "scripts" / "build_state.py"
spec = importlib.util.spec_from_file_location("build_state", SCRIPT)
build_state = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_state)

PYPROJECT = (
    '[project]\nname = "x"\ndependencies = ["torch>=2.11"]\n\n[tool.pytest.ini_options]\ntestpaths = ["tests"]\n'
)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    for name in build_state.BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "ops.cpp").write_text("int f();\n")
    (tmp_path / "csrc" / "cpu" / "kernel.h").write_text("#pragma once\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "sparseadapter_ext").mkdir()
    return tmp_path


def _build(root):
    suffix = build_state.sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    (root / "sparseadapter_ext" / f"_C{suffix}").write_bytes(b"\x7fELF")


def test_extension_needs_a_clean_build_until_recorded(tree):
    assert build_state.extension_status(tree) == "toolchain"
    with pytest.raises(SystemExit, match="no compiled library"):
        build_state.record_extension(tree)
    _build(tree)
    build_state.record_extension(tree)
    assert build_state.extension_status(tree) == "current"


@pytest.mark.parametrize(
    "edit",
    [
        lambda root: (root / "csrc" / "cpu" / "kernel.h").write_text("#pragma once\n// changed\n"),
        lambda root: (root / "csrc" / "ops.cpp").write_text("int f(); \n"),
        lambda root: (root / "csrc" / "cuda").mkdir() or (root / "csrc" / "cuda" / "k.cu").write_text("\n"),
        lambda root: (root / "csrc" / "ops.cpp").unlink(),
        lambda root: (root / "csrc" / "ops.cpp").rename(root / "csrc" / "ops2.cpp"),
        lambda root: (root / "setup.py").write_text("# setup, changed\n"),
        lambda root: (root / "VERSION").write_text("1.0.0\n"),
    ],
)
def test_a_changed_source_is_an_incremental_build(tree, edit):
    _build(tree)
    build_state.record_extension(tree)
    edit(tree)
    assert build_state.extension_status(tree) == "changed"


def test_files_that_are_not_sources_do_not_count(tree):
    _build(tree)
    build_state.record_extension(tree)
    (tree / "csrc" / "notes.txt").write_text("not compiled\n")
    (tree / "README.md").write_text("docs\n")
    assert build_state.extension_status(tree) == "current"


def test_a_deleted_library_is_rebuilt(tree):
    _build(tree)
    build_state.record_extension(tree)
    for lib in build_state.built_library(tree):
        lib.unlink()
    assert build_state.extension_status(tree) == "changed"


def test_a_build_variable_or_another_torch_is_a_clean_build(tree, monkeypatch):
    _build(tree)
    build_state.record_extension(tree)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build_state.extension_status(tree) == "toolchain"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert build_state.extension_status(tree) == "current"

    real = build_state.importlib.metadata.distribution

    class OtherTorch:
        version = "9.9.9+cu999"

        @staticmethod
        def locate_file(name):
            return Path("/elsewhere") / name

    monkeypatch.setattr(
        build_state.importlib.metadata, "distribution", lambda name: OtherTorch if name == "torch" else real(name)
    )
    assert build_state.extension_status(tree) == "toolchain"


def test_deps_stamp_follows_specs_project_table_and_setup(tree):
    venv = tree / "venv"
    specs = ["torch==2.13.0", "ninja"]
    assert not build_state.deps_current(venv, tree, specs)
    build_state.record_deps(venv, tree, specs)
    assert build_state.deps_current(venv, tree, specs)
    assert json.loads((venv / build_state.DEPS_STAMP).read_text())["specs"] == specs
    assert not build_state.deps_current(venv, tree, ["torch==2.14.1", "ninja"])
    assert not build_state.deps_current(venv, tree, specs + ["six"])

    (tree / "pyproject.toml").write_text(PYPROJECT.replace('"torch>=2.11"', '"torch>=2.11", "numpy"'))
    assert not build_state.deps_current(venv, tree, specs)
    build_state.record_deps(venv, tree, specs)
    (tree / "setup.py").write_text("# setup, changed\n")
    assert not build_state.deps_current(venv, tree, specs)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="without tomllib the whole pyproject.toml counts")
def test_tool_settings_in_pyproject_do_not_reinstall(tree):
    venv = tree / "venv"
    build_state.record_deps(venv, tree, ["ninja"])
    (tree / "pyproject.toml").write_text(PYPROJECT + "\n[tool.ruff]\nline-length = 120\n")
    assert build_state.deps_current(venv, tree, ["ninja"])


def test_command_line(tree, monkeypatch, capsys):
    monkeypatch.setattr(build_state, "ROOT", tree)
    assert build_state.main(["deps", "check", "--venv", str(tree / "v"), "--", "ninja"]) == 1
    assert build_state.main(["deps", "record", "--venv", str(tree / "v"), "--", "ninja"]) == 0
    assert build_state.main(["deps", "check", "--venv", str(tree / "v"), "--", "ninja"]) == 0
    _build(tree)
    build_state.main(["extension", "record"])
    build_state.main(["extension", "status"])
    assert capsys.readouterr().out.strip() == "current"
