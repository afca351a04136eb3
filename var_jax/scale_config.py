"""What the tokenizer and transformer configs share: a scale schedule (`patch_nums`) and a JSON round trip."""
from __future__ import annotations

import dataclasses
from typing import Any


class ScaleScheduleConfig:
    """Mixin for frozen dataclasses with a `patch_nums` field (token-map sides, coarse to fine)."""

    patch_nums: tuple[int, ...]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L = Σ pn²: every token of every scale."""
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (tuples become lists; `from_dict` restores them through __post_init__)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
        return cls(**d)
