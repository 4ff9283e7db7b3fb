"""numba, where it imports: the one place that imports it for the compiled kernels.

numba is in requirements.txt; where it is missing or its LLVM library will not load,
:data:`numba` is None, :func:`available` False, and every caller takes its torch/numpy
path, which gives the same values (the compiled kernels are tested against them).
Compiled code is cached next to the calling module (``cache=True``): the first process
on a machine compiles, later ones load it.
"""
try:
    import numba
except (ImportError, OSError):
    numba = None


def available():
    """Whether compiled kernels can run (numba importable)."""
    return numba is not None


def jit(fn):
    """``numba.njit(cache=True)(fn)``, or ``fn`` itself without numba (never called then)."""
    return numba.njit(cache=True)(fn) if numba is not None else fn
