"""Progressive training against the reference, step by step: the learning rate (lin<pg>), the scale index and the
per-token loss weights (the newest scale's ramp over pgwp) of a config with only `progressive` set, against an
independent transcription of the reference's loop (utils/arg_util.py defaults, utils/lr_control.py, train.py,
trainer.py), counted in epochs and iterations as the reference counts them."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from test_optimizer import reference_lr
from var_jax.scale_config import PATCH_NUMS_256, scale_begin_ends
from var_jax.train import optimizer
from var_jax.train.config_base import base_config
from var_jax.train.var import loss as var_loss
from var_jax.train.var.progressive import progressive_from_config, truncated_weights


def reference_run(ep, iters_train, patch_nums, *, pg, pg0, tblr, bs, wp0, wpe, pgwp=0.0):
    """[(lr, prog_si or -1, loss weights of the kept tokens)] for every iteration of the reference's run."""
    # arg_util.py: derived arguments
    wp = ep * 1 / 50
    pgwp = pgwp or ep * 1 / 300
    sche = f"lin{pg:g}" if pg > 0 else "lin0"
    tlr = tblr * bs / 256
    # trainer.py: state kept across iterations
    L = sum(pn * pn for pn in patch_nums)
    loss_weight = np.ones(L) / L
    begin_ends, cur = [], 0
    for pn in patch_nums:
        begin_ends.append((cur, cur + pn * pn))
        cur += pn * pn
    last_prog_si, prog_it, first_prog = -1, 0, True
    rows = []
    max_it = ep * iters_train
    for epoch in range(ep):
        for it in range(iters_train):
            g_it = epoch * iters_train + it
            wp_it = wp * iters_train
            lr = reference_lr(g_it, tlr, wp_it, max_it, wp0, wpe, sche)
            # train.py: the progressive stage
            if g_it <= wp_it:
                prog_si = pg0
            elif g_it >= max_it * pg:
                prog_si = len(patch_nums) - 1
            else:
                delta = len(patch_nums) - 1 - pg0
                progress = min(max((g_it - wp_it) / (max_it * pg - wp_it), 0), 1)
                prog_si = pg0 + round(progress * delta)
            # trainer.py train_step: the newest scale's warmup
            prog_wp_it = pgwp * iters_train
            if last_prog_si != prog_si:
                if last_prog_si != -1:
                    first_prog = False
                last_prog_si = prog_si
                prog_it = 0
            prog_it += 1
            prog_wp = max(min(prog_it / prog_wp_it, 1), 0.01)
            if first_prog:
                prog_wp = 1
            if prog_si == len(patch_nums) - 1:
                prog_si = -1
            if prog_si >= 0:
                bg, ed = begin_ends[prog_si]
                lw = loss_weight[:ed].copy()
                lw[bg:ed] *= min(max(prog_wp, 0), 1)
            else:
                lw = loss_weight
            rows.append((lr, prog_si, lw))
    return rows


@pytest.mark.parametrize("ep,iters_train,patch_nums,pg,pg0,ramp_steps", [
    (30, 50, (1, 2, 3, 4, 5, 6, 8, 10), 0.6, 2, -1.0),    # pgwp = 0.1 epoch = 5 iterations
    (7, 61, PATCH_NUMS_256, 0.75, 4, -1.0),                # fractional warmup (8.54) and pgwp (1.42 iterations)
    (12, 40, PATCH_NUMS_256, 0.5, 1, 12.5),                # pgwp given: 12.5 iterations = 0.3125 epochs
])
def test_schedule_matches_reference_step_by_step(ep, iters_train, patch_nums, pg, pg0, ramp_steps):
    total = ep * iters_train
    config = base_config("var")
    config.total_steps, config.batch_size, config.patch_nums = total, 96, patch_nums
    config.optim.tblr, config.optim.wpe = 2e-4, 0.01
    config.progressive.fraction, config.progressive.start_scale = pg, pg0
    config.progressive.ramp_steps = ramp_steps
    want = reference_run(ep, iters_train, patch_nums, pg=pg, pg0=pg0, tblr=2e-4, bs=96, wp0=config.optim.wp0,
                         wpe=0.01, pgwp=0.0 if ramp_steps < 0 else ramp_steps / iters_train)

    assert optimizer.schedule_name(config.optim, pg) == f"lin{pg:g}"
    lr = np.asarray(jax.vmap(optimizer.learning_rate_schedule(config.optim, 96, total, pg))(jnp.arange(total)))
    np.testing.assert_allclose(lr, [w[0] for w in want], rtol=2e-5, atol=1e-12)

    sched = progressive_from_config(config.progressive, len(patch_nums), total,
                                    optimizer.warmup_length(config.optim, total))
    last = len(patch_nums) - 1
    got_si = [sched.scale_at(s) for s in range(total)]
    assert [si if si < last else -1 for si in got_si] == [w[1] for w in want]
    assert len(set(got_si)) == last - pg0 + 1                 # every stage is visited
    slices, full = scale_begin_ends(patch_nums), var_loss.token_weights(patch_nums)
    ramped = 0
    for s in range(total):
        weights = np.asarray(truncated_weights(full, slices, got_si[s], sched.ramp_at(s)))
        np.testing.assert_allclose(weights, want[s][2], rtol=1e-6, err_msg=f"step {s}")
        ramped += want[s][1] >= 0 and weights[-1] < full[-1] * 0.999
    assert ramped > 0                                         # some steps really ramp


def test_auto_schedule_follows_progressive_and_an_explicit_one_wins():
    optim = base_config("var").optim
    assert optim.schedule == "auto"
    assert optimizer.schedule_name(optim, 0.0) == "lin0"
    assert optimizer.schedule_name(optim, 0.8) == "lin0.8"
    assert optimizer.schedule_name(optim, 1 / 3) == "lin0.333333"   # the reference's f'lin{pg:g}'
    optim.schedule = "lin0"
    assert optimizer.schedule_name(optim, 0.8) == "lin0"


def test_ramp_steps_derived_from_the_run_length():
    config = base_config("var")
    config.progressive.fraction = 0.5
    sched = progressive_from_config(config.progressive, 10, 900, 18.0)
    assert sched.ramp_steps == pytest.approx(3.0)           # the reference's pgwp = ep/300 epochs


@pytest.mark.parametrize("value", [0.0, -2.0, "soon"])
def test_bad_ramp_steps_is_named(value):
    prog = ml_collections.ConfigDict(dict(fraction=0.5, start_scale=4, ramp_steps=value))
    with pytest.raises(ValueError, match=r"progressive\.ramp_steps"):
        progressive_from_config(prog, 10, 900, 18.0)
