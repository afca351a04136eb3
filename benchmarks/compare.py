"""var-jax against the original PyTorch VAR, same workloads, same process run, alternating repetitions.

    python benchmarks/compare.py                                  # var-jax alone, every workload
    python benchmarks/compare.py --reference .ref/VAR --json compare.json
    python benchmarks/compare.py --reference .ref/VAR --workloads train,sample --depth 8 --repeats 2
    python benchmarks/compare.py --reference .ref/VAR --device gpu --repeats 5 --json $OUT/compare.json

`--reference DIR` is a checkout of github.com/FoundationVision/VAR (torch needed; its code is imported from DIR at
run time, never copied here). Random weights on both sides; nothing downloads.

Workloads (`--workloads a,b`; sizes from the flags):
  train           VAR-d{--depth} train step at 256 px, batch {--batch}, tokens given: forward + backward + AdamW
                  (reference: its VAR.forward on the teacher-forcing input from its quantizer's idxBl_to_var_input,
                  cross-entropy weighted 1/L as its trainer does, its AmpOptimizer: clip 2.0 and fused AdamW
                  betas (0.9, 0.95), weight decay 0.05 on its trainer's parameter groups)
  train_tokenize  the same with tokenising in the step (VQVAE encoder + multi-scale quantizer)
  sample          VAR-d{--sample-depth} sampling + decode with the released tokenizer shape (V 4096, Cvae 32,
                  ch 160), batch {--sample-batch}, cfg 1.5, top-k 900, top-p 0.96 (reference:
                  VAR.autoregressive_infer_cfg, which decodes too)
  encode, decode  tokenizer, released shape, batch {--tokenizer-batch}, 256 px (reference: VQVAE.img_to_idxBl and
                  idxBl_to_img(same_shape=True, last_one=True)); `tokenizer` selects both

Precision: on CPU everything is float32. On GPU (`--device gpu`) the train step and the sampler compute in
bfloat16 on both sides (var-jax's 'auto' compute dtype; torch.autocast(bfloat16) around the reference, i.e. its
trainer's `--fp16=2` and its sampling demo's autocast; the released recipe uses `--fp16=1`, float16 with a grad
scaler), the tokenizer in float32 with TF32 matmuls allowed on both (the reference's `tf32=True` default; XLA's
default float32 precision on GPU). The matmul peak is measured with one large matmul per framework in the dtype
of the transformer work (bfloat16 on GPU, float32 on CPU), at the start and at the end of the run; each
workload's fraction of it uses analytic FLOPs (var_jax.train.var.flops for the train step, sample_bench's count
for the sampler's transformer, conv + dot FLOPs of var-jax's jaxpr for the tokenizer), against that framework's
own peak.

Timing: compile (JAX) and the first call of each side are excluded and reported separately; then `--repeats`
pairs alternate (var-jax first in even pairs, the reference first in odd ones), each call preceded by a pause
(SETTLE_S, 1 s) and blocked on (block_until_ready / torch.cuda.synchronize); medians are reported. Peak memory: on
CPU the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs before each call) during
that side's calls; both frameworks live in the one process, so each figure includes the other's resident weights. On GPU: torch's
max_memory_allocated per call, and JAX's device peak_bytes_in_use (a process-lifetime peak: it only grows);
JAX is told not to preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false) so that both fit on one device. XLA's
estimate for the compiled var-jax program is reported too.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # share the GPU with torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))          # the sibling benchmark scripts

import var_jax  # noqa: E402,F401  (its CPU XLA flags, before JAX starts a backend)

from rss import reset_rss_peak, rss_peak  # noqa: E402

ALL_WORKLOADS = ("train", "train_tokenize", "sample", "encode", "decode")
# Pause before every timed call: torch's OpenMP workers keep the cores busy for a while after a call returns, and
# the JAX call that follows at once ran up to 1.3x slower (d8 tokenising train step: 6.4-6.7 s right after a torch
# call, 5.2 s after its own).
SETTLE_S = float(os.environ.get("COMPARE_SETTLE_S", "1.0"))
ALIASES = {"tokenizer": ("encode", "decode"), "all": ALL_WORKLOADS}


# ------------------------------------------------------------------------------------------------------ memory

class Side:
    """One framework's callable for one workload, with its timings and memory peaks."""

    def __init__(self, name, run, *, gpu, before=None, after=None):
        self.name, self.run, self.gpu = name, run, gpu
        self.before, self.after = before, after
        self.times, self.peaks, self.increments = [], [], []
        self.warmup_s = None

    def call(self) -> float:
        gc.collect()
        time.sleep(SETTLE_S)
        if self.before:
            self.before()
        elif not self.gpu:
            reset_rss_peak()
        start = None if (self.before or self.gpu) else rss_peak("VmRSS")
        t = time.perf_counter()
        self.run()
        dt = time.perf_counter() - t
        peak = self.after() if self.after else (None if self.gpu else rss_peak())
        if peak is not None:
            self.peaks.append(peak)
            if start is not None:
                self.increments.append(peak - start)
        return dt

    def warm(self):
        self.warmup_s = self.call()

    def timed(self):
        self.times.append(self.call())

    @property
    def median(self):
        return statistics.median(self.times) if self.times else None

    @property
    def peak(self):
        return max(self.peaks) if self.peaks else None

    @property
    def increment(self):
        return max(self.increments) if self.increments else None


# --------------------------------------------------------------------------------------------------- var-jax

def jax_matmul_peak(n: int, dtype: str, calls: int, rounds: int = 3) -> float:
    """FLOP/s of `calls` back-to-back n×n×n matmuls (one wait at the end), best of `rounds`."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        outs = [f(a, b) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, time.perf_counter() - t)
        del outs
    return 2.0 * n ** 3 * calls / best


def jax_device_memory_hooks(gpu: bool):
    """(before, after) for JAX on GPU: the device's peak bytes in use (process lifetime, not resettable)."""
    if not gpu:
        return None, None
    import jax

    def after():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    return (lambda: None), after


def jax_train(depth: int, batch: int, with_tokenizer: bool, compute_dtype: str = "auto", remat: str = "none"):
    """var-jax's train step as benchmarks/train_bench.py builds it: (run, compile_s, info)."""
    import jax

    import train_bench
    import tokenizer_bench
    from var_jax.sharding import make_mesh
    from var_jax.train.var import flops

    mesh = make_mesh((-1, 1, 1))
    prepared = train_bench.compiled_train_step(depth, batch, mesh, with_tokenizer, compute_dtype, remat)
    compiled, state, batch_data, frozen = (prepared[k] for k in ("compiled", "state", "batch", "frozen"))
    compile_s, var_cfg = prepared["compile_s"], prepared["var_cfg"]
    tokenize, tok_state, images = prepared["tokenize"], prepared["tok_state"], prepared["images"]
    holder = {"state": state}

    def run():
        with jax.set_mesh(mesh):
            holder["state"], m = compiled(holder["state"], batch_data, frozen)
            jax.block_until_ready((holder["state"], m))

    flop = flops.var_train_flops_per_example(var_cfg) * batch
    if with_tokenizer:   # the frozen encoder + quantizer, forward only
        flop += tokenizer_bench.matmul_flops(tokenize, tok_state, images)
    info = {"flops": flop, "compute_dtype": var_cfg.compute_dtype, "seq_len": var_cfg.seq_len,
            "xla_memory_estimate_bytes": memory_estimate(compiled)}
    return run, compile_s, info


def memory_estimate(compiled):
    import sample_bench
    try:
        value = sample_bench.memory_estimate(compiled)
    except Exception:
        return None
    return value if value >= 0 else None


def jax_sample(depth: int, batch: int, compute_dtype: str = "auto"):
    """var-jax's sampler as benchmarks/sample_bench.py builds it, with the decode: (run, compile_s, info)."""
    import jax
    import numpy as np
    from flax import nnx

    import sample_bench
    import tokenizer_bench
    from var_jax.sample.sampler import SampleOptions, make_sample_fn
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.host_memory import release_freed_memory
    from var_jax.tokenizer.vqvae import VQVAE, merge_for_decoding, split_for_decoding
    from var_jax.transformer import RunSettings, preset
    from var_jax.transformer.model import VAR

    tok_cfg = TokenizerConfig()
    var_cfg = preset(depth, patch_nums=tok_cfg.patch_nums).with_run_settings(RunSettings(compute_dtype=compute_dtype))
    # as the sample command's Sampler holds them: the tokenizer without its encoder, the compiler's heap trimmed
    tg, ts, encoder_spec = split_for_decoding(VQVAE(tok_cfg, rngs=nnx.Rngs(0)))
    vg, vs = nnx.split(VAR(var_cfg, rngs=nnx.Rngs(1)))
    labels = np.arange(batch, dtype=np.int32) * 97 % var_cfg.num_classes
    ids = np.arange(batch)
    fn = make_sample_fn(vg, tg, SampleOptions(cfg=1.5, top_k=900, top_p=0.96), decode=True,
                        encoder_spec=encoder_spec)
    t = time.perf_counter()
    compiled = fn.lower(vs, ts, labels, ids, 0).compile()
    compile_s = time.perf_counter() - t
    release_freed_memory()

    def run():
        jax.block_until_ready(compiled(vs, ts, labels, ids, 0))

    f_hat = jax.numpy.zeros((batch, tok_cfg.latent_size, tok_cfg.latent_size, tok_cfg.z_channels), "float32")
    decode_flops = tokenizer_bench.matmul_flops(lambda s, f: merge_for_decoding(tg, s, encoder_spec).decode(f),
                                                ts, f_hat)
    info = {"flops": sample_bench.transformer_flops(var_cfg, 2 * batch) + decode_flops,
            "compute_dtype": var_cfg.compute_dtype, "seq_len": var_cfg.seq_len,
            "xla_memory_estimate_bytes": memory_estimate(compiled)}
    return run, compile_s, info


def jax_tokenizer(which: str, batch: int):
    """var-jax's encode or decode as benchmarks/tokenizer_bench.py times them: (run, compile_s, info)."""
    import jax
    from flax import nnx

    import tokenizer_bench
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE

    cfg = TokenizerConfig()
    graphdef, state = nnx.split(VQVAE(cfg, rngs=nnx.Rngs(0)))
    images = jax.random.uniform(jax.random.key(1), (batch, cfg.image_size, cfg.image_size, 3),
                                minval=-1.0, maxval=1.0)
    arg = images
    if which == "decode":
        arg = jax.jit(tokenizer_bench.encode, static_argnums=0)(graphdef, state, images)
    fn = tokenizer_bench.encode if which == "encode" else tokenizer_bench.decode
    flop = tokenizer_bench.matmul_flops(lambda s, x: fn(graphdef, s, x), state, arg)
    t = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=0).lower(graphdef, state, arg).compile()
    compile_s = time.perf_counter() - t

    def run():
        jax.block_until_ready(compiled(state, arg))
    return run, compile_s, {"flops": flop, "compute_dtype": "float32",
                            "xla_memory_estimate_bytes": memory_estimate(compiled)}


# ------------------------------------------------------------------------------------------- the reference

class Reference:
    """The original code, imported from its checkout at run time."""

    def __init__(self, directory: str, gpu: bool):
        import torch
        self.torch = torch
        directory = str(Path(directory).resolve())
        if not (Path(directory) / "models" / "var.py").exists():
            raise SystemExit(f"--reference {directory}: no models/var.py there (a checkout of FoundationVision/VAR)")
        sys.path.insert(0, directory)
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            # models/var.py imports PyTorchModelHubMixin at module level, only as a base of VARHF (the hub
            # wrapper, which this benchmark never builds): a stand-in class lets the module import offline.
            stub = types.ModuleType("huggingface_hub")
            stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
            sys.modules["huggingface_hub"] = stub
        # its VAR.forward uses torch.cuda.amp.autocast(enabled=False), deprecated in current torch
        warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*", category=FutureWarning)
        import dist
        self.device = "cuda" if gpu else "cpu"
        vars(dist)["__device"] = self.device          # its VAR builds its generator on dist.get_device()
        self.gpu = gpu
        if gpu:
            # the reference's defaults (utils/arg_util.py: tf32=True)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @contextlib.contextmanager
    def quiet(self):
        """Its constructors print a lot, and filter_params prints with `force=` (a kwarg its training entry
        point adds to print); swallow both while building."""
        real = builtins.print
        builtins.print = lambda *a, **k: None
        try:
            yield
        finally:
            builtins.print = real

    def sync(self):
        if self.gpu:
            self.torch.cuda.synchronize()

    def amp(self):
        if self.gpu:
            return self.torch.autocast("cuda", enabled=True, dtype=self.torch.bfloat16, cache_enabled=True)
        return contextlib.nullcontext()

    def memory_hooks(self):
        if not self.gpu:
            return None, None
        torch = self.torch
        return torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated

    def build(self, depth: int):
        from models import build_vae_var
        torch = self.torch
        torch.manual_seed(0)
        with self.quiet():
            vae, var = build_vae_var(device=self.device, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                                     V=4096, Cvae=32, ch=160, share_quant_resi=4, num_classes=1000, depth=depth,
                                     shared_aln=False, attn_l2_norm=True, init_adaln=0.5, init_adaln_gamma=1e-5,
                                     init_head=0.02, init_std=-1)
            # build_vae_var disables nn.*.reset_parameters "for speed" (the checkpoint overwrites them); there is
            # no checkpoint here, so give the tokenizer's convolutions/norms finite random values
            for m in vae.modules():
                for name, p in list(m.named_parameters(recurse=False)):
                    with torch.no_grad():
                        if name == "weight" and p.ndim > 1:
                            p.normal_(0, 0.02)
                        elif name == "weight":
                            p.fill_(1.0)
                        else:
                            p.zero_()
        return vae, var

    def matmul_peak(self, n: int, dtype: str, calls: int, rounds: int = 3) -> float:
        """As jax_matmul_peak: `calls` back-to-back matmuls, one synchronisation, best of `rounds`."""
        torch = self.torch
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        a = torch.randn(n, n, device=self.device).to(dt)
        b = torch.randn(n, n, device=self.device).to(dt)
        out = torch.empty(n, n, device=self.device, dtype=dt)
        with torch.inference_mode():
            torch.matmul(a, b, out=out)
            self.sync()
            best = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(calls):
                    torch.matmul(a, b, out=out)
                self.sync()
                best = min(best, time.perf_counter() - t)
        return 2.0 * n ** 3 * calls / best

    def train(self, depth: int, batch: int, with_tokenizer: bool):
        """Its trainer's step (trainer.VARTrainer.train_step without the logging, prog_si = -1)."""
        import numpy as np
        from utils.amp_sc import AmpOptimizer
        from utils.lr_control import filter_params
        torch = self.torch
        vae, var = self.build(depth)
        var.train()
        quantize = vae.quantize
        with self.quiet():
            names, paras, groups = filter_params(var, nowd_keys={
                'cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul'})
        opt = torch.optim.AdamW(params=groups, lr=1e-4 * batch / 256, weight_decay=0, betas=(0.9, 0.95),
                                fused=True)
        for g in opt.param_groups:   # what its lr_wd_annealing sets every step (twd 0.05)
            g["lr"] = 1e-4 * batch / 256 * g.get("lr_sc", 1)
            g["weight_decay"] = 0.05 * g.get("wd_sc", 1)
        var_opt = AmpOptimizer(mixed_precision=2 if self.gpu else 0, optimizer=opt, names=names, paras=paras,
                               grad_clip=2.0, n_gradient_accumulation=1)
        train_loss = torch.nn.CrossEntropyLoss(label_smoothing=0.0, reduction="none")
        L = sum(pn * pn for pn in var.patch_nums)
        loss_weight = torch.ones(1, L, device=self.device) / L
        rng = np.random.default_rng(0)
        images = torch.from_numpy(np.tanh(rng.normal(size=(batch, 3, 256, 256))).astype(np.float32)).to(self.device)
        labels = torch.from_numpy(rng.integers(0, 1000, size=(batch,))).to(self.device)
        V = vae.vocab_size
        given = None
        if not with_tokenizer:
            idx = vae.img_to_idxBl(images)
            given = (idx, quantize.idxBl_to_var_input(idx))

        def run():
            if given is None:
                gt_idx_Bl = vae.img_to_idxBl(images)
                x_BLCv_wo_first_l = quantize.idxBl_to_var_input(gt_idx_Bl)
            else:
                gt_idx_Bl, x_BLCv_wo_first_l = given
            gt_BL = torch.cat(gt_idx_Bl, dim=1)
            with var_opt.amp_ctx:
                logits_BLV = var(labels, x_BLCv_wo_first_l)
                loss = train_loss(logits_BLV.view(-1, V), gt_BL.view(-1)).view(batch, -1)
                loss = loss.mul(loss_weight).sum(dim=-1).mean()
            var_opt.backward_clip_step(loss=loss, stepping=True)
            self.sync()
        return run

    def sample(self, depth: int, batch: int):
        torch = self.torch
        vae, var = self.build(depth)
        var.eval()
        labels = torch.arange(batch, device=self.device) * 97 % 1000

        def run():
            with torch.inference_mode(), self.amp():
                var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96,
                                             more_smooth=False)
            self.sync()
        return run

    def tokenizer(self, which: str, batch: int):
        torch = self.torch
        vae, _ = self.build(8)
        gen = torch.Generator().manual_seed(1)
        images = (torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1).to(self.device)
        with torch.inference_mode():
            idx = vae.img_to_idxBl(images)

        def run():
            with torch.inference_mode():
                if which == "encode":
                    vae.img_to_idxBl(images)
                else:
                    vae.idxBl_to_img(idx, same_shape=True, last_one=True)
            self.sync()
        return run


# -------------------------------------------------------------------------------------------------- driver

def write_json(path, payload):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def fmt_bytes(b):
    return f"{b / 2 ** 30:.2f}" if b else "-"


def fmt_mem(peak, increment):
    return fmt_bytes(peak) + (f" (+{increment / 2 ** 30:.2f})" if increment is not None else "")


def fmt_s(s):
    return f"{s:.3f}" if s is not None else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=None, help="checkout of FoundationVision/VAR; omit for var-jax alone")
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                        help=f"comma-separated from {ALL_WORKLOADS}; 'tokenizer' = encode,decode")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per workload after the warm-up")
    parser.add_argument("--depth", type=int, default=8, help="train workloads")
    parser.add_argument("--batch", type=int, default=4, help="train workloads")
    parser.add_argument("--sample-depth", type=int, default=16)
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--tokenizer-batch", type=int, default=4)
    parser.add_argument("--matmul-n", type=int, default=0, help="matmul peak size (0: 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--json", default=None, help="write one record per workload here")
    args = parser.parse_args()

    names = []
    for w in filter(None, (x.strip() for x in args.workloads.split(","))):
        for n in ALIASES.get(w, (w,)):
            if n not in ALL_WORKLOADS:
                raise SystemExit(f"--workloads: unknown {n!r}; choose from {ALL_WORKLOADS} or {tuple(ALIASES)}")
            if n not in names:
                names.append(n)
    gpu = args.device == "gpu"
    if not gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: JAX's default backend is {jax.default_backend()}")
    jax.devices()   # JAX's backend (and its CUDA libraries) up before torch is imported
    ref = Reference(args.reference, gpu) if args.reference else None
    if ref and gpu and not ref.torch.cuda.is_available():
        raise SystemExit("--device gpu: torch sees no CUDA device")

    peak_dtype = "bfloat16" if gpu else "float32"
    n = args.matmul_n or (8192 if gpu else 2048)
    calls = 20 if gpu else 2
    desc = f"jax {jax.__version__} ({jax.devices()[0].device_kind} x{jax.device_count()})"
    if ref:
        t = ref.torch
        desc += f", torch {t.__version__} ({t.cuda.get_device_name() if gpu else f'{t.get_num_threads()} threads'})"
    print(f"{desc}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; repeats {args.repeats}")
    peaks = {"var_jax": [jax_matmul_peak(n, peak_dtype, calls)]}
    if ref:
        peaks["reference"] = [ref.matmul_peak(n, peak_dtype, calls)]
    print("matmul peak at start (" + peak_dtype + f", {n}^3): "
          + ", ".join(f"{k} {v[0] / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    records = []
    for name in names:
        gc.collect()
        t = time.perf_counter()
        if name in ("train", "train_tokenize"):
            run, compile_s, info = jax_train(args.depth, args.batch, name == "train_tokenize")
            label = f"VAR-d{args.depth} train step, 256 px, batch {args.batch}, " + (
                "tokens given" if name == "train" else "tokenising in the step")
        elif name == "sample":
            run, compile_s, info = jax_sample(args.sample_depth, args.sample_batch)
            label = (f"VAR-d{args.sample_depth} sampling + decode, batch {args.sample_batch}, cfg 1.5, top-k 900, "
                     f"top-p 0.96")
        else:
            run, compile_s, info = jax_tokenizer(name, args.tokenizer_batch)
            label = f"tokenizer {name}, released shape, batch {args.tokenizer_batch}, 256 px"
        before, after = jax_device_memory_hooks(gpu)
        sides = [Side("var_jax", run, gpu=gpu, before=before, after=after)]
        build_s = {"var_jax": time.perf_counter() - t}
        if ref:
            t = time.perf_counter()
            if name in ("train", "train_tokenize"):
                ref_run = ref.train(args.depth, args.batch, name == "train_tokenize")
            elif name == "sample":
                ref_run = ref.sample(args.sample_depth, args.sample_batch)
            else:
                ref_run = ref.tokenizer(name, args.tokenizer_batch)
            before, after = ref.memory_hooks()
            sides.append(Side("reference", ref_run, gpu=gpu, before=before, after=after))
            build_s["reference"] = time.perf_counter() - t
        for side in sides:
            side.warm()
        for r in range(args.repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                side.timed()
        jx = sides[0]
        rf = sides[1] if ref else None
        rec = {"name": name, "description": label, "device": args.device,
               "var_jax_s": jx.median, "reference_s": rf.median if rf else None,
               "ratio": (rf.median / jx.median) if rf else None,
               "var_jax_times_s": jx.times, "reference_times_s": rf.times if rf else None,
               "var_jax_compile_s": compile_s, "var_jax_warmup_s": jx.warmup_s,
               "reference_warmup_s": rf.warmup_s if rf else None,
               "build_s": build_s,
               "var_jax_peak_memory_bytes": jx.peak, "reference_peak_memory_bytes": rf.peak if rf else None,
               "var_jax_peak_increment_bytes": jx.increment,
               "reference_peak_increment_bytes": rf.increment if rf else None,
               "peak_memory_kind": ("device: torch max_memory_allocated per call; JAX peak_bytes_in_use "
                                    "(process lifetime)") if gpu else
                                   ("process resident high-water mark (VmHWM) during that side's calls; "
                                    "increment: that peak minus the resident size when the call began"),
               "var_jax_xla_memory_estimate_bytes": info.get("xla_memory_estimate_bytes"),
               "flops": info.get("flops"), "compute_dtype": info.get("compute_dtype"),
               "repeats": args.repeats}
        records.append(rec)
        ratio = f", ratio {rec['ratio']:.2f}x" if rf else ""
        print(f"{name}: var-jax {fmt_s(jx.median)} s (compile {compile_s:.1f} s, warm-up {jx.warmup_s:.2f} s)"
              + (f", reference {fmt_s(rf.median)} s (warm-up {rf.warmup_s:.2f} s)" if rf else "") + ratio,
              flush=True)
        if args.json:   # after every workload, so that a run cut short still leaves its records
            write_json(args.json, {"records": records, "partial": True, "environment": desc, "args": vars(args)})
        del sides, run
        if ref:
            del ref_run
            if gpu:
                ref.torch.cuda.empty_cache()

    peaks["var_jax"].append(jax_matmul_peak(n, peak_dtype, calls))
    if ref:
        peaks["reference"].append(ref.matmul_peak(n, peak_dtype, calls))
    peak = {k: statistics.mean(v) for k, v in peaks.items()}
    print("matmul peak at end: " + ", ".join(f"{k} {v[1] / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
          + "; '% peak' below: analytic FLOPs / median time / the higher framework's mean of start and end "
          "(the machine's roofline for both; the JSON has each against its own peak too)")
    best = max(peak.values())
    for rec in records:
        f = rec["flops"]
        rec["var_jax_fraction_of_peak"] = f / rec["var_jax_s"] / best if f else None
        rec["reference_fraction_of_peak"] = f / rec["reference_s"] / best if f and rec["reference_s"] else None
        rec["var_jax_fraction_of_own_peak"] = f / rec["var_jax_s"] / peak["var_jax"] if f else None
        rec["reference_fraction_of_own_peak"] = (f / rec["reference_s"] / peak["reference"]
                                                 if f and rec["reference_s"] else None)
        rec["matmul_peak_flops_per_s"] = {k: v for k, v in peak.items()}
        rec["matmul_peak_dtype"] = peak_dtype

    mem = "device GiB" if gpu else "RSS GiB (+ during call)"
    cols = ["workload", "var-jax s", "reference s", "ratio ref/var-jax", "var-jax % peak", "ref % peak",
            "var-jax compile s", "var-jax warm-up s", "ref warm-up s", f"var-jax peak {mem}", f"ref peak {mem}",
            "XLA estimate GiB"]
    if not ref:
        cols = [c for c in cols if "ref" not in c]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for rec in records:
        pct = lambda x: f"{x:.0%}" if x else "-"
        cells = {"workload": rec["description"], "var-jax s": fmt_s(rec["var_jax_s"]),
                 "reference s": fmt_s(rec["reference_s"]),
                 "ratio ref/var-jax": f"{rec['ratio']:.2f}x" if rec["ratio"] else "-",
                 "var-jax % peak": pct(rec["var_jax_fraction_of_peak"]),
                 "ref % peak": pct(rec["reference_fraction_of_peak"]),
                 "var-jax compile s": f"{rec['var_jax_compile_s']:.1f}",
                 "var-jax warm-up s": fmt_s(rec["var_jax_warmup_s"]),
                 "ref warm-up s": fmt_s(rec["reference_warmup_s"]),
                 f"var-jax peak {mem}": fmt_mem(rec["var_jax_peak_memory_bytes"], rec["var_jax_peak_increment_bytes"]),
                 f"ref peak {mem}": fmt_mem(rec["reference_peak_memory_bytes"], rec["reference_peak_increment_bytes"]),
                 "XLA estimate GiB": fmt_bytes(rec["var_jax_xla_memory_estimate_bytes"])}
        print("| " + " | ".join(cells[c] for c in cols) + " |")
    print(f"\nmatmul peak ({peak_dtype}): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
          + f"; load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        write_json(args.json, {"records": records, "partial": False, "matmul_peak_flops_per_s": peak,
                               "matmul_peak_samples_flops_per_s": peaks, "matmul_peak_dtype": peak_dtype,
                               "environment": desc, "args": vars(args)})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
