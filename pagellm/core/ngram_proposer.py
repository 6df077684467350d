"""N-gram (prompt lookup) proposals: the tokens that followed the latest earlier
occurrence of the sequence's own suffix.

For the longest suffix length n from ``max_n`` down to ``min_n``, find the last position
where those n tokens occurred before (not the suffix itself) and propose the up to k
tokens that came after them there. Costs a few numpy comparisons over the sequence per
step, so it runs in the scheduler, on every request that wants speculation.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    if k <= 0 or length < min_n + 1:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = seq[length - n :]
        # Windows starting at 0 .. length - n - 1: every earlier occurrence.
        windows = sliding_window_view(seq[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return seq[start : start + k].tolist()  # type: ignore[no-any-return]
    return []
