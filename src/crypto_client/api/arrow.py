"""pyarrow in API processes: loaded by the first request that needs it (a Parquet export, a
quality report), without NumPy, as the production image has it, and on the C library's
allocator."""

import importlib
import os
import sys

# What the Parquet export and the quality report use; each looks for NumPy when imported.
_MODULES = ("pyarrow", "pyarrow.compute", "pyarrow.csv", "pyarrow.parquet")


def load_pyarrow() -> None:
    """Import pyarrow's modules that the API uses, once per process, without NumPy unless
    something already loaded it.

    The service's runtime dependencies do not include NumPy (pyarrow does not need it); only
    the development tools (pandas, Polars) install it. Finding it, pyarrow imports it (some
    15 MB), and then pandas as well (some 35 MB more) at about its first array, to ask whether
    the values are pandas objects: an API process on a development machine would carry 50 MB
    that production does not, and its memory would not be what production's is. So pyarrow's
    modules are kept from finding NumPy, and then skip those checks. (Inferring an array's type
    from Python objects still imports pandas where installed: the API's code declares types.)
    Anything importing NumPy afterwards still can; pyarrow in this process goes on without it.
    """
    if "pyarrow" in sys.modules:
        return
    # Arrow's default allocator (mimalloc) keeps some 15 MB more of an export's memory than
    # the C library's for no speed the export shows (bench/RESULTS.md); Arrow reads the
    # setting when it first allocates. An operator's own choice stands.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if "numpy" in sys.modules:
        return
    # A None entry makes `import numpy` raise ImportError, as where it is not installed.
    sys.modules["numpy"] = None  # type: ignore[assignment]
    try:
        for name in _MODULES:
            importlib.import_module(name)
    finally:
        del sys.modules["numpy"]
