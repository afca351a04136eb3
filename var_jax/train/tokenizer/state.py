"""The tokenizer train state: generator (VQVAE) + optional discriminator params, their two optimizers (one
`optax.multi_transform`), and the per-scale code-usage EMA; its sharded layout, init and warm start.

Builds on var_jax.train.state: the modules are held in one container so that `ModelParts`,
`abstract_train_state` and `init_train_state` serve as they are; the usage EMA (replicated) is added on top.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from var_jax.sharding import replicated
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.quantizer import usage_shape
from var_jax.train.tokenizer.discriminator import PatchDiscriminator
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.train.optimizer import decay_mask, make_optimizer
from var_jax.checkpoints import ModelParts, split_model
from var_jax.train.state import StateLayout, TrainState, abstract_train_state, init_train_state


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    base_channels: int = 64
    num_layers: int = 3


class TokenizerTrainModules(nnx.Module):
    """What the tokenizer stage trains: `generator` (the VQVAE) and, with the GAN on, `discriminator`."""

    def __init__(self, tokenizer_cfg: TokenizerConfig, disc_cfg: DiscriminatorConfig | None, *, rngs: nnx.Rngs):
        self.generator = VQVAE(tokenizer_cfg, rngs=rngs)
        if disc_cfg is not None:
            self.discriminator = PatchDiscriminator(3, disc_cfg.base_channels, disc_cfg.num_layers, rngs=rngs)


@flax.struct.dataclass
class TokenizerTrainState:
    step: jax.Array          # int32 scalar: updates done
    params: Any              # {'generator': ..., 'discriminator': ...} pure dicts of float32 arrays
    opt_state: Any           # optax.multi_transform state: one optimizer per key of params
    rng: jax.Array           # base key; per-step keys are fold_in(rng, step)
    counters: Any            # fault counters, as var_jax.train.state.TrainState.counters
    usage_ema: jax.Array     # (num_scales, V) float32 code-hit EMA (quantizer.update_usage_ema); BSQ: (S, bits)
    usage_updates: jax.Array # int32 scalar: EMA updates done


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def replace_path(tree, path, value):
    """A copy of nested dict `tree` with the leaf at `path` replaced (the rest shared, not copied)."""
    if not path:
        return value
    return {**tree, path[0]: replace_path(tree[path[0]], path[1:], value)}


def make_tokenizer_optimizer(parts: ModelParts, optim_cfg, disc_optim_cfg, *, batch_size: int,
                             total_steps: int) -> optax.GradientTransformation:
    """The generator's and the discriminator's optimizers (the VAR recipe's optax chain, each with its own
    config), combined by param key."""
    # multi_transform hands each inner optimizer the whole params tree with the other keys masked out, so
    # each decay mask is a prefix of the whole tree: this key's mask, a plain False for the others.
    full_mask = decay_mask(parts.param_vars)
    configs = {"generator": optim_cfg, "discriminator": disc_optim_cfg}
    txs = {name: make_optimizer(configs[name], batch_size=batch_size, total_steps=total_steps,
                                mask={k: (m if k == name else False) for k, m in full_mask.items()})
           for name in full_mask}
    return optax.multi_transform(txs, {name: name for name in txs})


def tokenizer_state_layout(parts: ModelParts, tx, mesh: Mesh, tokenizer_cfg: TokenizerConfig) -> StateLayout:
    base = abstract_train_state(parts, tx, mesh)
    rep = replicated(mesh)
    extra_abstract = dict(usage_ema=jax.ShapeDtypeStruct(usage_shape(tokenizer_cfg), jnp.float32, sharding=rep),
                          usage_updates=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    return StateLayout(
        abstract=TokenizerTrainState(**_fields(base.abstract), **extra_abstract),
        shardings=TokenizerTrainState(**_fields(base.shardings), usage_ema=rep, usage_updates=rep))


def init_tokenizer_state(model_fn, tx, layout: StateLayout, mesh: Mesh, seed: int) -> TokenizerTrainState:
    """Params and optimizer state born sharded (var_jax.train.state.init_train_state), a zero usage EMA."""
    base_layout = StateLayout(abstract=None, shardings=_train_state_part(layout.shardings))
    base = init_train_state(model_fn, tx, base_layout, mesh, seed)
    usage = layout.abstract.usage_ema
    return TokenizerTrainState(
        **_fields(base),
        usage_ema=jax.device_put(jnp.zeros(usage.shape, usage.dtype), layout.shardings.usage_ema),
        usage_updates=jax.device_put(jnp.zeros((), jnp.int32), layout.shardings.usage_updates))


def warm_start(state: TokenizerTrainState, tokenizer: VQVAE, layout: StateLayout) -> TokenizerTrainState:
    """Replace the generator params by those of a loaded tokenizer (e.g. `load_model_dir(dir).tokenizer`, from
    `var-jax convert` or an earlier run); the optimizer state stays fresh (its moments do not depend on the
    param values). Raises ValueError naming the parameters whose presence or shape differ."""
    _, loaded, _ = split_model(tokenizer)
    loaded = nnx.to_pure_dict(loaded)
    target = layout.abstract.params["generator"]
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(target)}
    have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
    if want != have:
        problems = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(f"warm start: the given tokenizer ({tokenizer.cfg}) does not fit the configured one; "
                         f"differing parameters: {problems[:10]}{' ...' if len(problems) > 10 else ''}")
    generator = jax.device_put(loaded, layout.shardings.params["generator"])
    return state.replace(params={**state.params, "generator": generator})


def _fields(x) -> dict:
    return {f: getattr(x, f) for f in ("step", "params", "opt_state", "rng", "counters")}


def _train_state_part(x) -> TrainState:
    return TrainState(**_fields(x))
