"""Keep the garbage collector's full passes short in long-running processes.

A worker or API process ends its startup holding a few hundred thousand objects that live
until exit (modules, Numba dispatchers, Faust, Litestar, numpy). CPython's full
(generation 2) collection walks every one of them: in the market worker each pass took
65-280 ms, about every 2 s under load, and each pass stalls every stream the process
serves (docs/benchmarks/market.md, "Fourth session"). `gc.freeze()` moves what exists at
the end of startup to a permanent generation the collector skips; cycles made afterwards
are still collected, by passes that then take a few milliseconds.

Only process entry points call this (`fintide worker`, `fintide api`): frozen objects are
never collected, so a test process that builds many apps must not.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect startup garbage, then exempt every surviving object from future collections.

    Returns how many objects are now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
