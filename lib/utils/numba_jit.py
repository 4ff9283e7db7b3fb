"""numba, where it imports: the one place that imports it for the compiled kernels.

numba is in requirements.txt; where it is missing or its LLVM library will not load,
:data:`numba` is None, :func:`available` False, and every caller takes its torch/numpy
path, which gives the same values (the compiled kernels are tested against them).
Compiled code is cached next to the calling module (``cache=True``): the first process
on a machine compiles, later ones load it.
"""
import logging

try:
    import numba
except (ImportError, OSError):
    numba = None


def available():
    """Whether compiled kernels can run (numba importable)."""
    return numba is not None


def jit(fn=None, *, fastmath=False, error_model="python"):
    """``numba.njit(cache=True, fastmath=fastmath, error_model=error_model)(fn)``, or ``fn``
    itself without numba (never called then); as ``@jit`` or ``@jit(fastmath=...)``.
    ``error_model="numpy"`` drops the check for division by zero, which otherwise keeps a
    loop that divides from vectorizing.

    Where no cache directory is writable (a read-only install, and no writable
    NUMBA_CACHE_DIR or home cache), numba refuses ``cache=True`` at decoration time;
    the function is then compiled in every process instead (~2 s once) rather than
    failing the import.
    """
    if fn is None:
        return lambda f: jit(f, fastmath=fastmath, error_model=error_model)
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, fastmath=fastmath, error_model=error_model)(fn)
    except RuntimeError as exc:   # "cannot cache function ...: no locator available"
        logging.getLogger(__name__).debug("numba cannot cache %s (%s): compiling per process",
                                          fn.__name__, exc)
        return numba.njit(fastmath=fastmath, error_model=error_model)(fn)
