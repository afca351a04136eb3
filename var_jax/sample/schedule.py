"""How the sampler walks the scales: which scales share one compiled (scanned) step, which get their own.

The scales have different token counts (1, 4, 9, …, 256 at 256 px), so one `lax.scan` over all of them pads
every step to the largest scale (≈4× the transformer work at 256 px), while unrolling every scale compiles one
transformer step per scale. A plan is a sequence of segments of consecutive scales:
- an unrolled segment is a single scale run with its exact shapes;
- a scanned segment runs its scales in one `lax.scan`, every step padded to the segment's largest scale and
  attending over the cache up to the segment's end. Padding is wasted work, so `grouped` mode only scans runs
  of small scales whose padding stays within a budget, and unrolls the large ones.
"""
from __future__ import annotations

import dataclasses

from var_jax.scale_config import prefix_len, scale_begin_ends

MODES = ("unrolled", "grouped", "scanned")
# grouped mode: total padded (wasted) query tokens allowed, as a fraction of the sequence length L.
DEFAULT_WASTE_BUDGET = 0.05


@dataclasses.dataclass(frozen=True)
class Segment:
    scales: tuple[int, ...]       # consecutive scale indices
    patch_nums: tuple[int, ...]   # their side lengths
    starts: tuple[int, ...]       # token offset of each scale in the full sequence

    @property
    def scanned(self) -> bool:
        return len(self.scales) > 1

    @property
    def max_side(self) -> int:
        return max(self.patch_nums)

    @property
    def step_tokens(self) -> int:
        """Query tokens per step (the padded size for a scanned segment)."""
        return self.max_side ** 2

    @property
    def kv_len(self) -> int:
        """Cache length the segment's steps attend over: the end of its last scale."""
        return self.starts[-1] + self.patch_nums[-1] ** 2

    @property
    def padding(self) -> int:
        return len(self.scales) * self.step_tokens - sum(pn * pn for pn in self.patch_nums)


def _segment(patch_nums, starts, scales) -> Segment:
    return Segment(tuple(scales), tuple(patch_nums[s] for s in scales), tuple(starts[s] for s in scales))


def scale_plan(patch_nums, mode: str = "grouped", waste_budget: float = DEFAULT_WASTE_BUDGET, *,
               cuts=(), unrolled_from: int | None = None) -> tuple[Segment, ...]:
    """Segments covering every scale in order. `waste_budget` (grouped mode) bounds the total padding.

    `cuts`: scales where a segment must begin (the sampler changes its batch rows or its model there);
    `unrolled_from`: scales from this one on always run unrolled (their steps need exact, static shapes).
    Without them the plan is the mode's plain plan."""
    patch_nums = tuple(int(p) for p in patch_nums)
    if any(b <= a for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f"patch_nums must be strictly increasing, got {patch_nums}")
    if mode not in MODES:
        raise ValueError(f"sampler mode must be one of {MODES}, got {mode!r}")
    starts = [begin for begin, _ in scale_begin_ends(patch_nums)]
    num = len(patch_nums)
    free_end = num if unrolled_from is None else max(0, min(num, unrolled_from))
    bounds = sorted({0, free_end} | {c for c in cuts if 0 < c < free_end})
    budget, spent, segments = waste_budget * prefix_len(patch_nums), 0, []
    for lo, hi in zip(bounds, bounds[1:]):
        if mode == "unrolled":
            segments += [_segment(patch_nums, starts, [s]) for s in range(lo, hi)]
        elif mode == "scanned":
            segments.append(_segment(patch_nums, starts, range(lo, hi)))
        else:
            piece, spent = _grouped(patch_nums, starts, lo, hi, budget, spent)
            segments += piece
    segments += [_segment(patch_nums, starts, [s]) for s in range(free_end, num)]
    return tuple(segments)


def _grouped(patch_nums, starts, lo: int, hi: int, budget: float, spent: float):
    """Grouped mode over scales [lo, hi): runs of scales scanned while the padding stays within what is left of
    the budget, the rest unrolled. Returns (segments, budget spent so far)."""
    segments, current = [], [lo]
    for s in range(lo + 1, hi):
        candidate = _segment(patch_nums, starts, current + [s])
        extra = candidate.padding - _segment(patch_nums, starts, current).padding
        if spent + extra <= budget:
            current.append(s)
            spent += extra
        else:
            segments.append(_segment(patch_nums, starts, current))
            current = [s]
    segments.append(_segment(patch_nums, starts, current))
    return segments, spent


def describe(plan) -> str:
    """One line per plan, e.g. 'scan[1,2,3,4] 5 6 8 10 13 16 (padding 34 tokens)'."""
    parts = [("scan[" + ",".join(map(str, seg.patch_nums)) + "]") if seg.scanned else str(seg.patch_nums[0])
             for seg in plan]
    return " ".join(parts) + f" (padding {sum(seg.padding for seg in plan)} tokens)"
