"""Sampling accelerators of the scale-by-scale sampler, all off by default (the plain sampler is then unchanged):
the settings, their checks, and the static plan that the sampler follows.

- `cfg_stop_scale` K (Switti, SkipVAR): from scale K on only the conditional rows run; the batch (inputs and KV
  cache) is cut to them once and the logits are unguided. Saves up to half the work of scales K…; trades the
  guidance of the late scales, which mostly refine texture.
- `draft_scales` N with a refiner (CoDe, training-free): the main model draws scales [0, N); a second (smaller)
  transformer of the same tokenizer prefills its KV cache over those scales in one block-causal pass and draws the
  rest. The late scales hold most of the FLOPs, so a small refiner saves most of the time; trades the large
  model's detail.
- `prune` {SI: R} (FastVAR-style, cached token pruning): at scale SI each block computes only its
  L − ⌊L·R⌋ tokens farthest from the scale's mean token (at that block's input); the other positions take the block's
  output at the last unpruned scale, area-upsampled. Only the kept tokens' keys are stored. Trades detail in flat
  regions.
- `kv_window` (C, W) (AMS-KV-style): scale s attends to scales [0, C) and [s−W, s] only and the cache holds only
  what a later scale still reads. Saves cache memory and attention work; trades long-range context.

Every count is static (keep counts, slots, windows), so the sampler stays one jitted function with static shapes.
Pruned scales and the scale they restore from run unrolled; the plan is cut where the batch rows or the model
change (schedule.scale_plan's `cuts` / `unrolled_from`).
"""
from __future__ import annotations

import dataclasses
import math

from var_jax.sample.cache_layout import CacheLayout, cache_layout, visible_scales
from var_jax.scale_config import scale_begin_ends


@dataclasses.dataclass(frozen=True)
class Accelerators:
    """Which accelerators run (static: a change recompiles). The defaults are all off."""
    cfg_stop_scale: int | None = None                 # K: scales K… run conditional rows only, unguided
    draft_scales: int | None = None                   # N: with a refiner, scales N… run on the refiner
    prune: tuple[tuple[int, float], ...] = ()         # ((SI, R), ...): at SI keep L − ⌊L·R⌋ tokens per block
    kv_window: tuple[int, int] | None = None          # (C, W): attend to scales [0, C) and [s−W, s]

    @property
    def active(self) -> bool:
        return (self.cfg_stop_scale is not None or self.draft_scales is not None or bool(self.prune)
                or self.kv_window is not None)

    def validate(self, num_scales: int, *, guided: bool, refiner: bool = False,
                 order: str = "scale") -> "Accelerators":
        """Raise ValueError (one line naming the option) for settings this model or these options cannot run."""
        if not self.active and not refiner:
            return self
        if order != "scale":
            raise ValueError(f"sampling accelerators are for next-scale models; this model has order={order!r}")
        if self.cfg_stop_scale is not None:
            if not guided:
                raise ValueError("cfg_stop_scale needs guidance (cfg > 0): without it there are no "
                                 "unconditional rows to stop")
            if not 1 <= self.cfg_stop_scale <= num_scales:
                raise ValueError(f"cfg_stop_scale must be in 1..{num_scales} (the number of scales = guidance "
                                 f"everywhere; cfg 0 = none at all), got {self.cfg_stop_scale}")
        if refiner and self.draft_scales is None:
            raise ValueError("a refiner needs draft_scales: the scale from which it draws")
        if self.draft_scales is not None and not refiner:
            raise ValueError("draft_scales needs a refiner model to draw the scales from there on")
        if self.draft_scales is not None and not 1 <= self.draft_scales <= num_scales - 1:
            raise ValueError(f"draft_scales must be in 1..{num_scales - 1} (scales drawn by the main model), got "
                             f"{self.draft_scales}")
        seen = set()
        for si, ratio in self.prune:
            if not 1 <= si <= num_scales - 1:
                raise ValueError(f"prune: scale {si} must be in 1..{num_scales - 1} (it restores from an earlier "
                                 f"scale)")
            if si in seen:
                raise ValueError(f"prune: scale {si} is given twice")
            seen.add(si)
            if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
                raise ValueError(f"prune: ratio {ratio} at scale {si} must be in [0, 1) (the share of tokens pruned)")
        if self.kv_window is not None:
            sinks, recent = self.kv_window
            if sinks < 0 or recent < 0:
                raise ValueError(f"kv_window: C and W must be >= 0, got {sinks},{recent}")
        return self

    def describe(self) -> dict:
        """The settings as JSON-safe values (recorded with a sampling run), only those that are on."""
        out = {}
        if self.cfg_stop_scale is not None:
            out["cfg_stop_scale"] = self.cfg_stop_scale
        if self.draft_scales is not None:
            out["draft_scales"] = self.draft_scales
        if self.prune:
            out["prune"] = [[si, ratio] for si, ratio in self.prune]
        if self.kv_window is not None:
            out["kv_window"] = list(self.kv_window)
        return out


def parse_prune(text: str) -> tuple[tuple[int, float], ...]:
    """'8:0.5,9:0.75' -> ((8, 0.5), (9, 0.75)), sorted by scale; ValueError naming the bad entry."""
    entries = []
    for part in (p.strip() for p in text.split(",")):
        scale, sep, ratio = part.partition(":")
        try:
            if not sep:
                raise ValueError
            entries.append((int(scale), float(ratio)))
        except ValueError:
            raise ValueError(f"--prune takes SCALE:RATIO entries separated by commas (e.g. 8:0.5,9:0.75), got "
                             f"{part!r}") from None
    return tuple(sorted(entries))


def parse_kv_window(text: str) -> tuple[int, int]:
    """'1,2' -> (1, 2)."""
    try:
        sinks, recent = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--kv-window takes C,W (two integers: the first C scales and the last W), got "
                         f"{text!r}") from None
    return sinks, recent


def keep_count(tokens: int, ratio: float) -> int:
    """Tokens a pruned scale computes: L − ⌊L·R⌋ (at least one, as R < 1)."""
    return tokens - math.floor(tokens * ratio)


# ---- the static plan ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phase:
    """One model's part of a sampling walk."""
    model: str                            # 'main' or 'refiner'
    scales: tuple[int, ...]               # the scales it draws
    prefill: int                          # scales [0, prefill) written into its cache in one pass first
    kept: tuple[int, ...]                 # tokens each scale computes (pruned scales: their keep count)
    sources: tuple[tuple[int, int], ...]  # (pruned scale, the scale whose block outputs fill its pruned tokens)
    layout: CacheLayout

    @property
    def collect(self) -> tuple[int, ...]:
        """Scales whose per-block outputs a later pruned scale restores from."""
        return tuple(sorted({src for _, src in self.sources}))

    def source_of(self, si: int) -> int | None:
        return dict(self.sources).get(si)


def plan_cuts(accel: Accelerators, guided: bool) -> tuple[int, ...]:
    """Scales where the sampler changes its rows (cfg stop) or its model (refiner): a segment starts there."""
    cuts = []
    if guided and accel.cfg_stop_scale is not None:
        cuts.append(accel.cfg_stop_scale)
    if accel.draft_scales is not None:
        cuts.append(accel.draft_scales)
    return tuple(cuts)


def pruned_scales(accel: Accelerators, patch_nums) -> dict[int, int]:
    """{scale: tokens kept} of the scales that prune at least one token (a ratio below 1/L prunes none)."""
    kept = {si: keep_count(patch_nums[si] ** 2, ratio) for si, ratio in accel.prune}
    return {si: k for si, k in kept.items() if k < patch_nums[si] ** 2}


def unrolled_from(accel: Accelerators, patch_nums) -> int | None:
    """Pruned scales and the scales they restore from need exact shapes: from the first of them on, unrolled."""
    pruned = pruned_scales(accel, patch_nums)
    if not pruned:
        return None
    num_scales = len(patch_nums)
    firsts = []
    for si in pruned:
        run = _phase_range(accel, num_scales, si)
        source = _source(si, pruned, run)
        firsts.append(source if source >= run.start else si)   # a refiner's prefill gives drafted sources
    return min(firsts)


def _phase_range(accel: Accelerators, num_scales: int, si: int) -> range:
    """The scales of the model that draws scale si."""
    n = accel.draft_scales
    if n is None:
        return range(num_scales)
    return range(0, n) if si < n else range(n, num_scales)


def _source(si: int, pruned, run: range) -> int:
    """The last scale before si that this model runs unpruned, or has prefilled (a refiner's drafted scales)."""
    return max(j for j in range(si) if j not in pruned or j not in run)


def phases(patch_nums, accel: Accelerators, segments) -> tuple[Phase, ...]:
    """The models' phases of a walk over `segments` (the scale plan, cut with plan_cuts / unrolled_from)."""
    patch_nums = tuple(patch_nums)
    num = len(patch_nums)
    n = accel.draft_scales
    runs = [("main", range(num))] if n is None else [("main", range(0, n)), ("refiner", range(n, num))]
    pruned = pruned_scales(accel, patch_nums)
    out = []
    for model, run in runs:
        kept = tuple(pruned[s] if s in pruned and s in run else p * p for s, p in enumerate(patch_nums))
        sources = tuple((s, _source(s, pruned, run)) for s in sorted(pruned) if s in run)
        scanned = [seg for seg in segments if seg.scanned and seg.scales[0] in run]
        dense = max([run.start] + [seg.scales[-1] + 1 for seg in scanned])
        min_length = max([seg.kv_len for seg in scanned], default=0)
        layout = cache_layout(patch_nums, run, window=accel.kv_window, stored=kept, dense_scales=dense,
                              min_length=min_length)
        out.append(Phase(model, tuple(run), run.start, kept, sources, layout))
    return tuple(out)


def step_shapes(patch_nums, accel: Accelerators, segments, guided: bool):
    """What each transformer pass computes, for FLOP counts: dicts of model, rows per image (2 with guidance),
    tokens through the blocks, tokens through the embedding and head, and the (queries, keys) groups of its
    attention. The refiner's prefill is one pass over the drafted prefix, block-causal (its head is counted though
    XLA drops its unused logits: about 1 % of a d16 sampling pass)."""
    begin_ends = scale_begin_ends(patch_nums)
    stop = accel.cfg_stop_scale if guided and accel.cfg_stop_scale is not None else None
    rows = lambda s: 2 if guided and (stop is None or s < stop) else 1
    shapes = []
    for phase in phases(patch_nums, accel, segments):
        layout = phase.layout
        if phase.prefill:
            groups = [(patch_nums[s] ** 2, _prefill_keys(patch_nums, accel, s)) for s in range(phase.prefill)]
            prefix = begin_ends[phase.prefill][0]
            shapes.append({"model": phase.model, "rows": rows(phase.prefill), "tokens": prefix, "head_tokens": prefix,
                           "attention": groups})
        for s in phase.scales:
            kept = phase.kept[s]
            keys = sum(n for _, n in layout.reads(s)) + kept
            shapes.append({"model": phase.model, "rows": rows(s), "tokens": kept, "head_tokens": patch_nums[s] ** 2,
                           "attention": [(kept, keys)]})
    return shapes


def _prefill_keys(patch_nums, accel: Accelerators, s: int) -> int:
    """Keys a prefilled token of scale s attends to: the visible earlier scales and its own."""
    visible = visible_scales(len(patch_nums), accel.kv_window)[s]
    return sum(patch_nums[j] ** 2 for j in visible) + patch_nums[s] ** 2


# ---- the refiner's tokenizer ----------------------------------------------------------------------------------

def _first_difference(a: dict, b: dict) -> str | None:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v    # JSON lists vs tuples
    for key in sorted(set(a) | set(b)):
        if norm(a.get(key)) != norm(b.get(key)):
            return f"{key}: {b.get(key)!r} (refiner) vs {a.get(key)!r}"
    return None


# What a refiner must share with the main model: the tokenizer's codes and scales, the classes, and how tokens
# are predicted and fed back (fields a config does not have are skipped).
REFINER_FIELDS = ("vocab_size", "z_channels", "patch_nums", "num_classes", "order", "head", "bits", "input_resize")


def check_refiner(main_cfg, refiner_cfg) -> None:
    """Two VARConfigs: the refiner must draw the main model's tokens; ValueError naming the first field that
    differs."""
    if refiner_cfg is None:
        return
    for name in REFINER_FIELDS:
        main, other = getattr(main_cfg, name, None), getattr(refiner_cfg, name, None)
        if main != other:
            raise ValueError(f"the refiner does not draw this model's tokens: {name} {other!r} (refiner) vs "
                             f"{main!r}")


def check_refiner_config(main: dict, refiner: dict) -> None:
    """config.json of the main model and of the refiner (read_model_config), before either loads: the refiner
    needs a VAR transformer of the same tokens and classes, and a tokenizer it carries must have the same config.
    ValueError in one line."""
    from var_jax.transformer.config import VARConfig
    if not refiner.get("var"):
        raise ValueError("the refiner's model directory has no VAR transformer")
    if refiner.get("tokenizer"):
        diff = _first_difference(main["tokenizer"], refiner["tokenizer"])
        if diff:
            raise ValueError(f"the refiner comes with another tokenizer ({diff}); it must share the model's")
    check_refiner(VARConfig.from_dict(main["var"]), VARConfig.from_dict(refiner["var"]))


def check_same_tokenizer(bundle, refiner) -> None:
    """Loaded models: a tokenizer that comes with the refiner must be the main model's, parameter for
    parameter (ValueError in one line)."""
    import jax
    import numpy as np
    from flax import nnx
    if refiner.var is None:
        raise ValueError("the refiner's model directory has no VAR transformer")
    if refiner.tokenizer is None:
        return
    diff = _first_difference(bundle.tokenizer_config.to_dict(), refiner.tokenizer_config.to_dict())
    if diff:
        raise ValueError(f"the refiner comes with another tokenizer ({diff}); it must share the model's")
    ours, theirs = (jax.tree.leaves(nnx.state(b.tokenizer, nnx.Param)) for b in (bundle, refiner))
    if len(ours) != len(theirs) or not all(np.array_equal(a, b) for a, b in zip(ours, theirs)):
        raise ValueError("the refiner comes with a tokenizer of the same shape but other weights; refiner and "
                         "model must share one tokenizer")
