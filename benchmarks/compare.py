"""var-jax against the original PyTorch VAR, same workloads, each framework in its own worker process.

    python benchmarks/compare.py                                  # var-jax alone, every workload
    python benchmarks/compare.py --reference .ref/VAR --json compare.json
    python benchmarks/compare.py --reference .ref/VAR --workloads train,sample --depth 8 --repeats 2
    python benchmarks/compare.py --reference .ref/VAR --device gpu --repeats 5 --json $OUT/compare.json
    python benchmarks/compare.py --smoke --json /tmp/smoke.json  # tiny sizes, seconds: checks that it runs

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
`--smoke`: every size tiny (d1, batch 1, a V 1024 / Cvae 8 / ch 32 tokenizer at 64 px with patch_nums (1, 2, 4),
one repeat, 256^3 matmuls, no settle pause), to check the script end to end; its times mean nothing.

Processes: the lead (this script) imports neither framework. It starts one worker per framework
(`compare.py --worker var_jax|reference`, JSON lines on the worker's stdin/stdout; the worker's own prints go to
stderr), so neither side's thread pools, allocator or resident weights sit in the other's process. Each request is
answered before the next is sent, so only one side computes at a time; the other waits idle on its pipe.

Precision: on CPU everything is float32. On GPU (`--device gpu`) the train step and the sampler compute in
bfloat16 on both sides (var-jax's 'auto' compute dtype; torch.autocast(bfloat16) around the reference, i.e. its
trainer's `--fp16=2` and its sampling demo's autocast; the released recipe uses `--fp16=1`, float16 with a grad
scaler), the tokenizer in float32 with TF32 matmuls allowed on both (the reference's `tf32=True` default; XLA's
default float32 precision on GPU). The matmul peak is measured inside each worker with one large matmul in the
dtype of the transformer work (bfloat16 on GPU, float32 on CPU), at the start and at the end of the run; each
workload's fraction of it uses analytic FLOPs (var_jax.train.var.flops for the train step, sample_bench's count
for the sampler's transformer, conv + dot FLOPs of var-jax's jaxpr for the tokenizer), against that framework's
own peak and against the higher of the two.

Timing: compile (JAX) and the first call of each side are excluded and reported separately; then `--repeats`
pairs alternate (var-jax first in even pairs, the reference first in odd ones), each call preceded, inside its
worker, by a garbage collection and a pause (SETTLE_S, 1 s) and blocked on (block_until_ready /
torch.cuda.synchronize); medians are reported. Peak memory: on CPU the worker's resident high-water mark (VmHWM,
reset through /proc/self/clear_refs before each call), i.e. that framework's alone, and how far it rose above the
resident size at the start of the call. On GPU: torch's max_memory_allocated per call, and JAX's device
peak_bytes_in_use (a process-lifetime peak: it only grows); JAX is told not to preallocate
(XLA_PYTHON_CLIENT_PREALLOCATE=false) so that both fit on one device. XLA's estimate for the compiled var-jax
program is reported too.

The JSON (`--json FILE`, rewritten after every workload) holds the records and `machine`: the CPU model and flags
(/proc/cpuinfo), the CPU count, the kernel release, each framework's versions and threads, and each side's matmul
peak samples measured in its own worker.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))          # the sibling benchmark scripts

from rss import reset_rss_peak, rss_peak  # noqa: E402

if __name__ != "__main__":
    # imported by accelerator.py for the var-jax side: var-jax's CPU XLA flags before JAX starts a backend
    import var_jax  # noqa: E402,F401

ALL_WORKLOADS = ("train", "train_tokenize", "sample", "encode", "decode")
ALIASES = {"tokenizer": ("encode", "decode"), "all": ALL_WORKLOADS}
SIDES = ("var_jax", "reference")
# Pause before every timed call: torch's OpenMP workers keep the cores busy for a while after a call returns, and
# the JAX call that follows at once ran up to 1.3x slower (d8 tokenising train step: 6.4-6.7 s right after a torch
# call, 5.2 s after its own). Separate processes do not change that: the cores are shared all the same.
SETTLE_S = float(os.environ.get("COMPARE_SETTLE_S", "1.0"))
SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
# The tokenizer both sides build: the released one (vae_ch160v4096z32.pth), or --smoke's tiny one. The reference's
# build_vae_var takes these four; both keep its other defaults (ch_mult (1, 1, 2, 2, 4): 16x downsampling,
# share_quant_resi 4), so an image is patch_nums[-1] * 16 px.
RELEASED_TOKENIZER = {"vocab_size": 4096, "z_channels": 32, "ch": 160, "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}
SMOKE_TOKENIZER = {"vocab_size": 1024, "z_channels": 8, "ch": 32, "patch_nums": (1, 2, 4)}   # V >= top-k 900
SMOKE_SIZES = {"depth": 1, "batch": 1, "sample_depth": 1, "sample_batch": 1, "tokenizer_batch": 1, "repeats": 1,
               "matmul_n": 256}
DOWNSAMPLE = 16
NUM_CLASSES = 1000
# CPU features that decide which kernels the two frameworks' libraries pick (recorded in full in the JSON too)
NOTABLE_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                     "amx_int8")


def image_size(tokenizer: dict) -> int:
    return tokenizer["patch_nums"][-1] * DOWNSAMPLE


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


def jax_tokenizer_config(tokenizer: dict | None):
    from var_jax.tokenizer.config import TokenizerConfig
    return TokenizerConfig(**tokenizer) if tokenizer else TokenizerConfig()


def jax_train(depth: int, batch: int, with_tokenizer: bool, compute_dtype: str = "auto", remat: str = "none",
              tokenizer: dict | None = None):
    """var-jax's train step as benchmarks/train_bench.py builds it: (run, compile_s, info)."""
    import jax

    import train_bench
    import tokenizer_bench
    from var_jax.sharding import make_mesh
    from var_jax.train.var import flops

    mesh = make_mesh((-1, 1, 1))
    prepared = train_bench.compiled_train_step(depth, batch, mesh, with_tokenizer, compute_dtype, remat,
                                               tok_cfg=jax_tokenizer_config(tokenizer))
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


def jax_sample(depth: int, batch: int, compute_dtype: str = "auto", tokenizer: dict | None = None):
    """var-jax's sampler as benchmarks/sample_bench.py builds it, with the decode: (run, compile_s, info)."""
    import jax
    import numpy as np
    from flax import nnx

    import sample_bench
    import tokenizer_bench
    from var_jax.sample.sampler import SampleOptions, make_sample_fn
    from var_jax.host_memory import release_freed_memory
    from var_jax.tokenizer.vqvae import VQVAE, merge_for_decoding, split_for_decoding
    from var_jax.transformer import RunSettings, preset
    from var_jax.transformer.model import VAR

    tok_cfg = jax_tokenizer_config(tokenizer)
    var_cfg = preset(depth, vocab_size=tok_cfg.vocab_size, z_channels=tok_cfg.z_channels,
                     patch_nums=tok_cfg.patch_nums).with_run_settings(RunSettings(compute_dtype=compute_dtype))
    # as the sample command's Sampler holds them: the tokenizer without its encoder, the compiler's heap trimmed
    tg, ts, encoder_spec = split_for_decoding(VQVAE(tok_cfg, rngs=nnx.Rngs(0)))
    vg, vs = nnx.split(VAR(var_cfg, rngs=nnx.Rngs(1)))
    labels = np.arange(batch, dtype=np.int32) * 97 % var_cfg.num_classes
    ids = np.arange(batch)
    fn = make_sample_fn(vg, tg, SampleOptions(**SAMPLING), decode=True, encoder_spec=encoder_spec)
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


def jax_tokenizer(which: str, batch: int, tokenizer: dict | None = None):
    """var-jax's encode or decode as benchmarks/tokenizer_bench.py times them: (run, compile_s, info)."""
    import jax
    from flax import nnx

    import tokenizer_bench
    from var_jax.tokenizer.vqvae import VQVAE

    cfg = jax_tokenizer_config(tokenizer)
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


class JaxSide:
    """The var-jax worker's framework: builds each workload and measures JAX's matmul peak."""

    name = "var_jax"

    def __init__(self, options: dict):
        import var_jax  # noqa: F401  (its CPU XLA flags, before JAX starts a backend)
        import jax
        self.jax, self.gpu, self.tokenizer = jax, options["device"] == "gpu", options["tokenizer"]
        if self.gpu and jax.default_backend() != "gpu":
            raise SystemExit(f"--device gpu: JAX's default backend is {jax.default_backend()}")
        jax.devices()

    def describe(self) -> dict:
        import importlib.metadata as metadata
        jax = self.jax
        return {"jax": jax.__version__, "jaxlib": metadata.version("jaxlib"), "flax": metadata.version("flax"),
                "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "pid": os.getpid(),
                "other_framework_loaded": "torch" in sys.modules}

    def matmul_peak(self, n: int, dtype: str, calls: int) -> float:
        return jax_matmul_peak(n, dtype, calls)

    def build(self, workload: str, sizes: dict):
        """(run, compile_s, info) of one workload."""
        if workload in ("train", "train_tokenize"):
            return jax_train(sizes["depth"], sizes["batch"], workload == "train_tokenize", tokenizer=self.tokenizer)
        if workload == "sample":
            return jax_sample(sizes["sample_depth"], sizes["sample_batch"], tokenizer=self.tokenizer)
        return jax_tokenizer(workload, sizes["tokenizer_batch"], tokenizer=self.tokenizer)

    def memory_hooks(self):
        """(before, after) on GPU: the device's peak bytes in use (process lifetime, not resettable)."""
        if not self.gpu:
            return None, None

        def after():
            return (self.jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        return (lambda: None), after

    def release(self):
        pass


# ------------------------------------------------------------------------------------------- the reference

class ReferenceSide:
    """The original code, imported from its checkout at run time, in the reference worker."""

    name = "reference"

    def __init__(self, options: dict):
        directory = str(Path(options["reference"]).resolve())
        if not (Path(directory) / "models" / "var.py").exists():
            raise SystemExit(f"--reference {directory}: no models/var.py there (a checkout of FoundationVision/VAR)")
        import torch
        self.torch, self.tokenizer = torch, options["tokenizer"]
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
        self.gpu = options["device"] == "gpu"
        self.device = "cuda" if self.gpu else "cpu"
        if self.gpu and not torch.cuda.is_available():
            raise SystemExit("--device gpu: torch sees no CUDA device")
        vars(dist)["__device"] = self.device          # its VAR builds its generator on dist.get_device()
        if self.gpu:
            # the reference's defaults (utils/arg_util.py: tf32=True)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def describe(self) -> dict:
        torch = self.torch
        return {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if self.gpu else "cpu", "pid": os.getpid(),
                "other_framework_loaded": "jax" in sys.modules}

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

    def release(self):
        if self.gpu:
            self.torch.cuda.empty_cache()

    def build_models(self, depth: int):
        from models import build_vae_var
        torch = self.torch
        torch.manual_seed(0)
        t = self.tokenizer
        with self.quiet():
            vae, var = build_vae_var(device=self.device, patch_nums=tuple(t["patch_nums"]), V=t["vocab_size"],
                                     Cvae=t["z_channels"], ch=t["ch"], share_quant_resi=4, num_classes=NUM_CLASSES,
                                     depth=depth, shared_aln=False, attn_l2_norm=True, init_adaln=0.5,
                                     init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
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

    def build(self, workload: str, sizes: dict):
        """(run, compile_s, info) of one workload; torch compiles nothing."""
        if workload in ("train", "train_tokenize"):
            run = self.train(sizes["depth"], sizes["batch"], workload == "train_tokenize")
        elif workload == "sample":
            run = self.sample(sizes["sample_depth"], sizes["sample_batch"])
        else:
            run = self.tokenizer_run(workload, sizes["tokenizer_batch"])
        return run, None, {}

    def train(self, depth: int, batch: int, with_tokenizer: bool):
        """Its trainer's step (trainer.VARTrainer.train_step without the logging, prog_si = -1)."""
        import numpy as np
        from utils.amp_sc import AmpOptimizer
        from utils.lr_control import filter_params
        torch = self.torch
        vae, var = self.build_models(depth)
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
        size = image_size(self.tokenizer)
        images = torch.from_numpy(np.tanh(rng.normal(size=(batch, 3, size, size))).astype(np.float32)).to(self.device)
        labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, size=(batch,))).to(self.device)
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
        vae, var = self.build_models(depth)
        var.eval()
        labels = torch.arange(batch, device=self.device) * 97 % NUM_CLASSES

        def run():
            with torch.inference_mode(), self.amp():
                var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, more_smooth=False, **SAMPLING)
            self.sync()
        return run

    def tokenizer_run(self, which: str, batch: int):
        torch = self.torch
        vae, _ = self.build_models(8)
        gen = torch.Generator().manual_seed(1)
        size = image_size(self.tokenizer)
        images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(self.device)
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


# ------------------------------------------------------------------------------------------------ the worker

class Workload:
    """One built workload inside a worker: its callable, timed one call at a time."""

    def __init__(self, run, gpu: bool, hooks, settle_s: float):
        self.run, self.gpu, self.settle_s = run, gpu, settle_s
        self.before, self.after = hooks

    def call(self) -> dict:
        """Seconds of one call after a collection and the settle pause, and the memory peak it reached."""
        gc.collect()
        time.sleep(self.settle_s)
        if self.before:
            self.before()
        elif not self.gpu:
            reset_rss_peak()
        start = None if (self.before or self.gpu) else rss_peak("VmRSS")
        t = time.perf_counter()
        self.run()
        seconds = time.perf_counter() - t
        peak = self.after() if self.after else (None if self.gpu else rss_peak())
        increment = peak - start if peak is not None and start is not None else None
        return {"s": seconds, "peak": peak, "increment": increment}


def serve(side: str):
    """The worker's loop: one JSON request per line on stdin, one JSON answer per line on the protocol channel
    (the original stdout; everything else the process prints goes to stderr)."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def answer(payload):
        channel.write(json.dumps(payload) + "\n")

    framework, workload = None, None
    for line in sys.stdin:
        request = json.loads(line)
        command = request["command"]
        try:
            if command == "start":
                options = request["options"]
                framework = (JaxSide if side == "var_jax" else ReferenceSide)(options)
                settle_s = options["settle_s"]
                answer({"describe": framework.describe()})
            elif command == "matmul_peak":
                answer({"flops_per_s": framework.matmul_peak(request["n"], request["dtype"], request["calls"])})
            elif command == "build":
                t = time.perf_counter()
                run, compile_s, info = framework.build(request["workload"], request["sizes"])
                workload = Workload(run, framework.gpu, framework.memory_hooks(), settle_s)
                answer({"compile_s": compile_s, "info": info, "build_s": time.perf_counter() - t})
            elif command == "call":
                answer(workload.call())
            elif command == "release":
                workload = None
                gc.collect()
                framework.release()
                answer({})
            elif command == "stop":
                answer({})
                return
            else:
                answer({"error": f"unknown command {command!r}"})
        except SystemExit as e:          # a refusal meant for the user (a bad --reference, no GPU): one line
            answer({"error": str(e)})
            return
        except Exception as e:
            traceback.print_exc()
            answer({"error": f"{type(e).__name__}: {e}"})
            return


# --------------------------------------------------------------------------------------------------- the lead

class Worker:
    """The lead's handle on one framework's worker process."""

    def __init__(self, side: str, options: dict):
        env = dict(os.environ)
        if side == "var_jax":
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")     # share the GPU with torch
            if options["device"] == "cpu":
                env.setdefault("JAX_PLATFORMS", "cpu")
        self.side = side
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", side],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.describe = self.request("start", options=options)["describe"]

    def request(self, command: str, **fields) -> dict:
        """Send one request and wait for its answer; a worker's failure ends the run with one line."""
        try:
            self.proc.stdin.write(json.dumps({"command": command, **fields}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise SystemExit(f"the {self.side} worker exited ({self.proc.wait()}) during '{command}'")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"{self.side} worker, '{command}': {reply['error']}")
        return reply

    def stop(self):
        if self.proc.poll() is None:
            with contextlib.suppress(SystemExit):
                self.request("stop")
            self.proc.wait(timeout=60)


class Side:
    """One framework's timings and memory peaks for one workload, measured in its worker."""

    def __init__(self, worker: Worker):
        self.worker, self.name = worker, worker.side
        self.times, self.peaks, self.increments = [], [], []
        self.warmup_s = None

    def call(self) -> float:
        reply = self.worker.request("call")
        if reply["peak"] is not None:
            self.peaks.append(reply["peak"])
        if reply["increment"] is not None:
            self.increments.append(reply["increment"])
        return reply["s"]

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


def machine_info() -> dict:
    """What the lead can read of the machine without either framework: CPU model and flags, CPUs, kernel."""
    model, flags = None, []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.split()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model or platform.processor() or None, "cpu_flags": flags,
            "cpu_flags_notable": [f for f in NOTABLE_CPU_FLAGS if f in flags], "cpu_count": os.cpu_count(),
            "cpus_usable": usable, "kernel": platform.release(), "system": platform.system(),
            "python": platform.python_version(), "load_average_start": os.getloadavg()[0]}


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


def parse_args(argv=None):
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
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes for every workload (overrides the size flags): checks that it runs")
    parser.add_argument("--json", default=None, help="write one record per workload here")
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE_SIZES.items():
            setattr(args, name, value)
    return args


def workload_names(spec: str) -> list[str]:
    names = []
    for w in filter(None, (x.strip() for x in spec.split(","))):
        for n in ALIASES.get(w, (w,)):
            if n not in ALL_WORKLOADS:
                raise SystemExit(f"--workloads: unknown {n!r}; choose from {ALL_WORKLOADS} or {tuple(ALIASES)}")
            if n not in names:
                names.append(n)
    return names


def describe_workload(name: str, args, px: int) -> str:
    if name in ("train", "train_tokenize"):
        return f"VAR-d{args.depth} train step, {px} px, batch {args.batch}, " + (
            "tokens given" if name == "train" else "tokenising in the step")
    if name == "sample":
        return (f"VAR-d{args.sample_depth} sampling + decode, batch {args.sample_batch}, cfg {SAMPLING['cfg']}, "
                f"top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}")
    return f"tokenizer {name}, {'released' if px == 256 else 'smoke'} shape, batch {args.tokenizer_batch}, {px} px"


def main():
    args = parse_args()
    if args.worker:
        serve(args.worker)
        return
    names = workload_names(args.workloads)
    gpu = args.device == "gpu"
    tokenizer = SMOKE_TOKENIZER if args.smoke else RELEASED_TOKENIZER
    px = image_size(tokenizer)
    settle_s = float(os.environ.get("COMPARE_SETTLE_S", "0" if args.smoke else SETTLE_S))
    options = {"device": args.device, "reference": args.reference, "tokenizer": tokenizer, "settle_s": settle_s}
    sizes = {k: getattr(args, k) for k in ("depth", "batch", "sample_depth", "sample_batch", "tokenizer_batch")}
    machine = machine_info()

    workers = {}
    try:
        workers["var_jax"] = Worker("var_jax", options)    # JAX's backend (and its CUDA libraries) up first
        if args.reference:
            workers["reference"] = Worker("reference", options)
        run_all(args, names, gpu, px, sizes, settle_s, machine, workers)
    finally:
        for worker in workers.values():
            worker.stop()


def run_all(args, names, gpu, px, sizes, settle_s, machine, workers):
    machine["frameworks"] = {side: w.describe for side, w in workers.items()}
    jx_info = workers["var_jax"].describe
    desc = f"jax {jx_info['jax']} ({jx_info['device_kind']} x{jx_info['device_count']})"
    if "reference" in workers:
        rf_info = workers["reference"].describe
        desc += f", torch {rf_info['torch']} ({rf_info['device'] if gpu else str(rf_info['threads']) + ' threads'})"
    print(f"{desc}; {machine['cpu_model']} ({', '.join(machine['cpu_flags_notable']) or 'no AVX-512/AMX'}), "
          f"{machine['cpu_count']} CPUs, kernel {machine['kernel']}, load average {machine['load_average_start']:.1f}; "
          f"each side in its own worker process; repeats {args.repeats}")

    peak_dtype = "bfloat16" if gpu else "float32"
    n = args.matmul_n or (8192 if gpu else 2048)
    calls = 20 if gpu else 2

    def measure_peaks(peaks):
        for side, worker in workers.items():
            peaks.setdefault(side, []).append(worker.request("matmul_peak", n=n, dtype=peak_dtype,
                                                             calls=calls)["flops_per_s"])

    peaks = {}
    measure_peaks(peaks)
    print("matmul peak at start (" + peak_dtype + f", {n}^3, each in its worker): "
          + ", ".join(f"{k} {v[0] / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    def payload(records, partial):
        machine["matmul_peak_samples_flops_per_s"] = peaks
        machine["matmul_peak_dtype"] = peak_dtype
        return {"records": records, "partial": partial, "environment": desc, "machine": machine,
                "design": "each framework in its own worker process, calls alternating", "lead_pid": os.getpid(),
                "settle_s": settle_s, "args": vars(args)}

    records = []
    for name in names:
        built = {side: w.request("build", workload=name, sizes=sizes) for side, w in workers.items()}
        sides = [Side(workers[side]) for side in built]
        for side in sides:
            side.warm()
        for r in range(args.repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                side.timed()
        jx = sides[0]
        rf = sides[1] if len(sides) > 1 else None
        info, compile_s = built["var_jax"]["info"], built["var_jax"]["compile_s"]
        rec = {"name": name, "description": describe_workload(name, args, px), "device": args.device,
               "var_jax_s": jx.median, "reference_s": rf.median if rf else None,
               "ratio": (rf.median / jx.median) if rf else None,
               "var_jax_times_s": jx.times, "reference_times_s": rf.times if rf else None,
               "var_jax_compile_s": compile_s, "var_jax_warmup_s": jx.warmup_s,
               "reference_warmup_s": rf.warmup_s if rf else None,
               "build_s": {side: b["build_s"] for side, b in built.items()},
               "var_jax_peak_memory_bytes": jx.peak, "reference_peak_memory_bytes": rf.peak if rf else None,
               "var_jax_peak_increment_bytes": jx.increment,
               "reference_peak_increment_bytes": rf.increment if rf else None,
               "peak_memory_kind": ("device: torch max_memory_allocated per call; JAX peak_bytes_in_use "
                                    "(process lifetime)") if gpu else
                                   ("the side's worker process: resident high-water mark (VmHWM) during its calls; "
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
            write_json(args.json, payload(records, True))
        for worker in workers.values():
            worker.request("release")

    measure_peaks(peaks)
    peak = {k: statistics.mean(v) for k, v in peaks.items()}
    machine["matmul_peak_flops_per_s"] = peak
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
        rec["matmul_peak_flops_per_s"] = dict(peak)
        rec["matmul_peak_dtype"] = peak_dtype
    print_table(records, gpu, has_reference=len(workers) > 1)
    print(f"\nmatmul peak ({peak_dtype}): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
          + f"; load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        final = payload(records, False)
        final.update(matmul_peak_flops_per_s=peak, matmul_peak_samples_flops_per_s=peaks,
                     matmul_peak_dtype=peak_dtype)
        write_json(args.json, final)
        print(f"wrote {args.json}")


def print_table(records, gpu: bool, has_reference: bool):
    mem = "device GiB" if gpu else "RSS GiB (+ during call)"
    cols = ["workload", "var-jax s", "reference s", "ratio ref/var-jax", "var-jax % peak", "ref % peak",
            "var-jax compile s", "var-jax warm-up s", "ref warm-up s", f"var-jax peak {mem}", f"ref peak {mem}",
            "XLA estimate GiB"]
    if not has_reference:
        cols = [c for c in cols if "ref" not in c]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for rec in records:
        pct = lambda x: f"{x:.0%}" if x else "-"  # noqa: E731
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


if __name__ == "__main__":
    main()
