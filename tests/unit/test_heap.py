"""ops.heap: startup objects leave the collector's generations."""

from __future__ import annotations

import gc

from ops.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector can free it


def test_freeze_startup_heap_exempts_live_objects_and_still_collects_later_cycles() -> None:
    kept = [_Node() for _ in range(1_000)]
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(kept)
        assert gc.is_tracked(kept[0]) and not any(o is kept[0] for o in gc.get_objects(generation=2))
        _Node()  # unreachable after this line: a cycle made after the freeze
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
