"""Loads the compiled library (which registers torch.ops.sparseadapter) and refuses one built from
older sources than this package, before anything else (the path cache's exit hook) can call into it."""

from . import _C

if not hasattr(_C, "__version__"):
    raise ImportError(
        f"{_C.__file__} was built from older sources than this package; rebuild it "
        "(bash scripts/install.sh, or python setup.py build_ext --inplace)"
    )
