"""The scale schedule, in one place: the reference token-map sides, where each scale sits in the flattened
L-long sequence, and what the tokenizer and transformer configs share (`patch_nums` and a JSON round trip).

Every module that needs scale offsets, scale ids or prefix lengths calls the functions here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

# Token-map sides of the released models (downsample 16), by image size.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
REFERENCE_PATCH_NUMS = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512}


def scale_begin_ends(patch_nums: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """[begin, end) of every scale in the flattened sequence (scale s holds patch_nums[s]² tokens)."""
    return _begin_ends(tuple(int(pn) for pn in patch_nums))


def scale_ids(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Scale index of every position of the sequence."""
    return _scale_ids(tuple(int(pn) for pn in patch_nums))


# Cached: models and samplers ask for these at every trace.
@functools.lru_cache(maxsize=64)
def _begin_ends(patch_nums: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + pn * pn))
        cur += pn * pn
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _scale_ids(patch_nums: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(si for si, (begin, end) in enumerate(_begin_ends(patch_nums)) for _ in range(end - begin))


def prefix_len(patch_nums: Sequence[int], num_scales: int | None = None) -> int:
    """Length of the sequence made of the first `num_scales` scales (None: all of them, L = Σ pn²)."""
    if num_scales is None:
        num_scales = len(patch_nums)
    if not 1 <= num_scales <= len(patch_nums):
        raise ValueError(f"num_scales must be in [1, {len(patch_nums)}], got {num_scales}")
    return scale_begin_ends(patch_nums)[num_scales - 1][1]


class ScaleScheduleConfig:
    """Mixin for frozen dataclasses with a `patch_nums` field (token-map sides, coarse to fine)."""

    patch_nums: tuple[int, ...]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L = Σ pn²: every token of every scale."""
        begin_ends = scale_begin_ends(self.patch_nums)
        return begin_ends[-1][1] if begin_ends else 0

    @property
    def scale_begin_ends(self) -> tuple[tuple[int, int], ...]:
        return scale_begin_ends(self.patch_nums)

    @property
    def scale_ids(self) -> tuple[int, ...]:
        return scale_ids(self.patch_nums)

    def prefix_len(self, num_scales: int) -> int:
        return prefix_len(self.patch_nums, num_scales)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (tuples become lists; `from_dict` restores them through __post_init__)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        return cls(**d)
