"""Shared pieces of the batch indicator kernels.

TA-Lib's Python wrapper (ta-lib 0.8.2) does two things around every C call that the
kernels must reproduce to give the same NaN pattern:

* it skips leading NaNs: the C function sees ``x[begin:]`` where ``begin`` is the first
  bar at which *every* input is non-NaN (``len - 1`` when there is none), and
* it writes NaN over ``begin + lookback`` leading outputs, the rest come from C.

NaNs after ``begin`` are fed to the C arithmetic as they are, so each kernel follows the
C source's operation order and comparisons exactly; that is what makes NaN gaps
propagate (or heal) the way TA-Lib's do.

The bundled TA-Lib C library (0.8.1) calls ``fma()`` explicitly in some indicators
(EMA family, MACD, ATR/NATR, SAR, BBANDS bands). ``fma`` below lowers to LLVM's
``llvm.fma.f64``, a correctly rounded fused multiply-add like C's, so those kernels stay
bit-identical instead of drifting by an ulp per step.

Conventions shared by every kernel module:

* ``error_model="numpy"``: float division by zero gives inf/NaN as in C instead of
  raising, and the per-division zero check disappears from the hot loops;
* hot loops walk views with a zero-based counter (``src[k]``, ``dst[k]``) rather than
  ``x[i - lookback]``: Numba must treat a possibly negative index as wrap-around, and
  that address arithmetic made several loops instruction-bound;
* Numba's on-disk cache is invalidated per source file. After editing a kernel that
  other modules call (``fma``, ``true_range``, ``ma_into``), delete
  ``indicators/__pycache__/_batch_*`` so the callers are recompiled too.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

NAN = np.nan


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """Return ``a * b + c`` rounded once, as C99 ``fma`` does."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)

    return sig, codegen


@njit(cache=True, error_model="numpy")
def begin_index1(a: np.ndarray) -> int:
    """First bar where ``a`` is not NaN, else the last bar (TA-Lib wrapper rule)."""
    n = a.shape[0]
    for i in range(n):
        if a[i] == a[i]:
            return i
    return n - 1


@njit(cache=True, error_model="numpy")
def begin_index2(a: np.ndarray, b: np.ndarray) -> int:
    """First bar where both inputs are non-NaN, else the last bar."""
    n = a.shape[0]
    for i in range(n):
        if a[i] == a[i] and b[i] == b[i]:
            return i
    return n - 1


@njit(cache=True, error_model="numpy")
def begin_index3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> int:
    """First bar where all three inputs are non-NaN, else the last bar."""
    n = a.shape[0]
    for i in range(n):
        if a[i] == a[i] and b[i] == b[i] and c[i] == c[i]:
            return i
    return n - 1


@njit(cache=True, error_model="numpy")
def begin_index4(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> int:
    """First bar where all four inputs are non-NaN, else the last bar."""
    n = a.shape[0]
    for i in range(n):
        if a[i] == a[i] and b[i] == b[i] and c[i] == c[i] and d[i] == d[i]:
            return i
    return n - 1


@njit(cache=True, error_model="numpy")
def nan_output(n: int, nan_count: int) -> np.ndarray:
    """An output of ``n`` bars whose first ``nan_count`` are NaN, the rest unset."""
    out = np.empty(n)
    for i in range(min(nan_count, n)):
        out[i] = NAN
    return out
