"""Cache-sized blocks of rows or columns, for the blocked torch backends (Sinkhorn, soft-target
cross-entropy, k-means).

About BLOCK_ELEMENTS elements per block (4 MiB of float32), so that a block's temporaries stay in
cache across its ~10 elementwise ops (the fastest of 2^18 to 2^24 on one thread), but at most
MAX_BLOCKS of them: each op is a parallel region, whose fork/join costs milliseconds where other
processes share the cores (DINO's 64 one-row blocks ran 5x slower than 8 blocks with 2 threads on
the README's shared machine).
"""
from __future__ import annotations

from typing import List, Optional

BLOCK_ELEMENTS = 1 << 20
MAX_BLOCKS = 8


def blocks(count: int, elements_each: int, *, scale: int = 1, max_blocks: Optional[int] = MAX_BLOCKS) -> List[slice]:
    """Slices of range(count) (rows or columns of ``elements_each`` elements each): blocks of
    about ``scale`` × BLOCK_ELEMENTS elements, at most ``max_blocks`` of them (None: no cap, for
    tiles whose matrix product dwarfs a fork/join), at least one row or column each."""
    step = max(1, scale * BLOCK_ELEMENTS // max(1, elements_each), -(-count // max_blocks) if max_blocks else 1)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]
