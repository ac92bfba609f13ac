"""One version: VERSION is read by pyproject.toml (package metadata), setup.py (compiled into the
extension) and CMakeLists.txt (the C++ library; tests/serving/test_cpp_libtorch.py finds the installed package
by this exact version). Nothing else spells it."""

import re
import subprocess
import sys

from repo_paths import REPO

import sparseadapter
import sparseadapter_ext

VERSION = (REPO / "VERSION").read_text(encoding="utf-8").strip()


def test_version_file_is_semantic():
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION


def test_python_packages_and_extension_report_it():
    assert sparseadapter_ext.__version__ == VERSION
    assert sparseadapter_ext._C.__version__ == VERSION
    assert sparseadapter.__version__ == VERSION


def test_pyproject_and_cmake_read_the_file():
    if sys.version_info >= (3, 11):
        import tomllib

        pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
        assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
        assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"file": "VERSION"}
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'file\(STRINGS "\$\{CMAKE_CURRENT_SOURCE_DIR\}/VERSION" SA_VERSION', cmake)
    assert re.search(r"project\(SparseAdapter VERSION \$\{SA_VERSION\}", cmake)


def test_no_other_file_spells_the_version():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"""(__version__|\bversion)\s*=\s*["']\d+\.\d+\.\d+["']|project\(\S+ VERSION \d""")
    spelled = [
        path
        for path in tracked
        if path.endswith((".py", ".toml", ".txt", ".cfg", ".cmake", ".in"))
        and (REPO / path).is_file()
        and pattern.search((REPO / path).read_text(encoding="utf-8", errors="replace"))
    ]
    assert spelled == [], f"a version spelled outside VERSION: {spelled}"
