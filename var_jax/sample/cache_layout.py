"""Where each scale's keys live in the sampler's KV cache, and which earlier scales each scale attends to.

The plain sampler stores scale s at its sequence positions [begin_s, end_s) and every scale attends to all earlier
ones. Two accelerators change that (var_jax/sample/accelerate.py):
- a KV window (C, W): scale s attends to scales [0, C) and [s−W, s] only, so a scale's keys are dead once the last
  scale that reads them has run, and the cache holds only the live ones;
- pruning: a pruned scale computes (and stores) only its kept tokens, so its slot is shorter than the scale.

A layout is static (Python ints): every slot offset and every read is known when the sampler is traced, so all
shapes stay static. Scales below `dense_scales` keep their natural positions and full size (a scanned segment
writes and masks by sequence position; a refiner's prefill writes the drafted prefix in one block); the others get
slots by first fit over their live intervals [s, last scale that reads s], largest first, so a slot is reused once
it is dead (window (1, 1) at 256 px: 270 positions instead of 424).
"""
from __future__ import annotations

import dataclasses

from var_jax.scale_config import scale_begin_ends


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    slots: tuple[tuple[int, int] | None, ...]   # per scale: (offset, stored tokens), None = never stored
    visible: tuple[tuple[int, ...], ...]          # per scale: the earlier scales its queries attend to
    length: int                                   # cache positions
    natural: bool                                 # the plain layout: scale s at its sequence positions, all visible

    def reads(self, si: int) -> tuple[tuple[int, int], ...]:
        """(offset, length) ranges of the cache that scale si's queries read: its visible slots, adjacent ones
        merged (attention does not depend on the order of its keys)."""
        ranges = sorted(self.slots[j] for j in self.visible[si] if self.slots[j] is not None)
        merged: list[list[int]] = []
        for offset, length in ranges:
            if merged and merged[-1][0] + merged[-1][1] == offset:
                merged[-1][1] += length
            else:
                merged.append([offset, length])
        return tuple((o, n) for o, n in merged)


def visible_scales(num_scales: int, window: tuple[int, int] | None) -> tuple[tuple[int, ...], ...]:
    """Per scale s, the earlier scales it attends to: all of them, or with window (C, W) those in [0, C) and
    [s−W, s)."""
    if window is None:
        return tuple(tuple(range(s)) for s in range(num_scales))
    sinks, recent = window
    return tuple(tuple(j for j in range(s) if j < sinks or j >= s - recent) for s in range(num_scales))


def cache_layout(patch_nums, run: range, *, window=None, stored=None, dense_scales: int = 0,
                 min_length: int = 0) -> CacheLayout:
    """The layout of one model's cache. `run`: the scales this model computes (its queries); scales below
    run.start were computed elsewhere and are prefilled. `stored`: tokens stored per scale (default the scale's
    size; a pruned scale stores its kept count). `dense_scales`: scales kept at natural positions and full size.
    `min_length`: positions that must exist (a scanned segment writes padding up to its end)."""
    patch_nums = tuple(patch_nums)
    num = len(patch_nums)
    begin_ends = scale_begin_ends(patch_nums)
    sizes = tuple(p * p for p in patch_nums) if stored is None else tuple(stored)
    visible = visible_scales(num, window)
    visible = tuple(vis if s in run else () for s, vis in enumerate(visible))
    natural = window is None and sizes == tuple(p * p for p in patch_nums)
    last_reader = {j: max((s for s in run if j in visible[s]), default=None) for j in range(num)}
    dense_end = begin_ends[dense_scales][0] if dense_scales < num else begin_ends[-1][1]
    slots: list[tuple[int, int] | None] = [None] * num
    for j in range(min(dense_scales, num)):
        slots[j] = (begin_ends[j][0], patch_nums[j] ** 2)
    compact = [j for j in range(dense_scales, num) if last_reader[j] is not None]
    if natural:   # the plain layout: natural positions
        for j in compact:
            slots[j] = (begin_ends[j][0], sizes[j])
    # largest first: the late scales dominate, and the small early ones then fill the gaps between them
    live: list[tuple[int, int, int, int]] = []   # (offset, length, first scale, last scale) of compact slots
    for j in ([] if natural else sorted(compact, key=lambda j: (-sizes[j], j))):
        slots[j] = (_first_fit(live, dense_end, sizes[j], j, last_reader[j]), sizes[j])
        live.append((*slots[j], j, last_reader[j]))
    ends = [o + n for slot in slots if slot is not None for o, n in [slot]]
    if max(ends, default=0) > begin_ends[-1][1]:   # fragmented past the sequence (never seen): natural offsets fit
        slots = [None if slot is None else (begin_ends[j][0], slot[1]) for j, slot in enumerate(slots)]
        ends = [o + n for slot in slots if slot is not None for o, n in [slot]]
    length = max([1, dense_end if dense_scales else 0, min_length] + ends)
    if natural and run and run.start == 0:   # the plain sampler writes its first scale even when nothing reads it
        length = max(length, begin_ends[0][1])
    return CacheLayout(tuple(slots), visible, length, natural)


def _first_fit(live, start: int, size: int, first: int, last: int) -> int:
    """The lowest offset >= start where `size` positions overlap no slot live at any time in [first, last]."""
    busy = sorted((o, o + n) for o, n, a, b in live if a <= last and first <= b)
    offset = start
    for lo, hi in busy:
        if offset + size <= lo:
            break
        offset = max(offset, hi)
    return offset
