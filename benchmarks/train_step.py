r"""One train step, medjax (jax) against the same-width MONAI U-Net (PyTorch), same batch.

  python benchmarks/train_step.py                                # the default experiment
  python benchmarks/train_step.py --host jax                     # … under jax's defaults
  python benchmarks/train_step.py --preset shards --size 128 --batch 4
  python benchmarks/train_step.py --preset shards --size 256 --batch 32 --dtype bfloat16
  python benchmarks/train_step.py --config experiments/phantom.py:method=flow \
      --config.model.channels=64 --steps 30                      # any config, any override
  python benchmarks/train_step.py --profile /tmp/medjax_trace    # + a jax.profiler trace,
                                                                 #   summarised per op kind

medjax side: built as `medjax.train.train_and_evaluate` builds it — `translators.build`,
`run.create_state`, `train.make_train_step` (jit, shardings, state donated) over the mesh
`parallel.mesh_for` gives, in a process set up as the commands set it up (`--host medjax`:
`medjax.host.configure`, on a CPU one device per core; `--host jax`: jax's defaults) — and timed
with `block_until_ready` after every step. MONAI side: `monai.networks.nets.
DiffusionModelUNet` of the same widths (levels, res blocks, attention levels, heads,
GroupNorm) trained with the same flow-matching loss (t ~ logit-normal, x_t = (1-t)·noise
+ t·target, MSE on the velocity target − noise), AdamW with the same schedule, weight
decay, global-norm clipping and the same warmed-up EMA, in eager PyTorch
(`torch.set_num_threads` = this process's cores; on GPU with autocast for bf16/fp16).
Both sides train on the same batches, materialised before timing: real phantom batches
from `pipeline.train_dataset` for a phantom config at its own grid, fixed random batches
otherwise (`--data`). The sides alternate for `--rounds` rounds of `--steps` timed steps
(each after `--warmup` untimed ones) so that a change in the machine's load hits both;
images/s is batch / median step time over all timed steps.

Also reported: parameter counts (the two nets differ only in how the time embedding enters
a residual block — medjax's FiLM scale+shift has twice MONAI's additive projection — and in
attention biases), peak memory (jax: `compiled.memory_analysis()`, on GPU
`device.memory_stats()`; torch: on GPU `max_memory_allocated`, on CPU an estimate = saved
activations + 5 × parameters (weights, gradients, two Adam moments, EMA), the process's RSS
high-water mark beside it), FLOPs per step from `compiled.cost_analysis()` (and torch's
`FlopCounterMode` as a check that both nets do the same work), and on an accelerator the MFU
against the chip's dense peak (`PEAK_TFLOPS`). Without torch/monai (`pip install -e
'.[bench]'`) it says so and reports medjax alone. The 1-minute load average is printed
beside every figure: on a shared machine a figure taken under load is not comparable.

Last line: one JSON object {"medjax_img_per_s", "monai_img_per_s", "ratio", "peak_bytes",
"flops_per_step", "mfu", "device", "dtype", "config", "load_avg", …}.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import gzip
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from medjax.host import cores  # the cores this process may run on (its affinity mask)

REPO = Path(__file__).resolve().parent.parent

# Dense peak TFLOP/s per chip for the compute dtype (bf16/fp16 tensor cores; float32 on
# Hopper/Ampere runs as TF32 when XLA/torch allow it, so the float32 MFU uses TF32's peak).
PEAK_TFLOPS = {  # substring of the device's name → {dtype: peak}
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},  # SXM; PCIe ≈ 756
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
}


def medjax_tree() -> str:
  """The commit and whether medjax/ differs from it (figures of a moving tree are not
  comparable): 'ae7c0e9' or 'ae7c0e9+medjax-diff:3f2a…'."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
    diff = subprocess.run(["git", "diff", "HEAD", "--", "medjax"], cwd=REPO,
                          capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  if not diff:
    return head
  import hashlib
  return f"{head}+medjax-diff:{hashlib.sha1(diff).hexdigest()[:8]}"


def load_avg() -> float:
  return round(os.getloadavg()[0], 2)


def log(*parts):
  print(*parts, flush=True)


# --- the config ---------------------------------------------------------------------------

def build_config(args, overrides):
  from medjax import config as config_lib
  config = config_lib.load(args.config, overrides)
  config.unlock()
  if args.preset == "shards":
    # The width and optimiser of `config.shards_config` (one accelerator, 256² slices),
    # kept on the phantom's data description so no prepared shards are needed.
    shards = config_lib.shards_config(tuple(config.data.source), config.data.target,
                                      config.translator.name)
    config.model = shards.model
    for key in ("batch_size", "learning_rate", "warmup_steps", "weight_decay", "grad_clip",
                "ema_decay", "total_steps"):
      config.train[key] = shards.train[key]
    if args.size is None:
      args.size = 256
  if args.size is not None:
    depth = config.data.phantom.shape[2]
    config.data.phantom.shape = (args.size, args.size, depth)
  if args.batch is not None:
    config.train.batch_size = args.batch
  medjax_dtype = None
  if args.dtype != "float32":
    if "dtype" in config.model:
      config.model.dtype = args.dtype
      medjax_dtype = args.dtype
    else:
      log(f"medjax: this medjax has no model.dtype key (`medjax config {args.config}` lists "
          f"none), so it cannot run {args.dtype}: skipping the medjax side")
  else:
    medjax_dtype = "float32"
  config.lock()
  return config, medjax_dtype


def describe_config(config, args) -> str:
  model = config.model
  h, w = config.data.phantom.shape[:2]
  return (f"{args.preset}: {config.translator.name}, {h}x{w}, batch {config.train.batch_size}, "
          f"{model.name} {model.channels}x{tuple(model.channel_mult)} "
          f"res_blocks={model.num_res_blocks} attention={tuple(model.attention_levels)}")


# --- the batches (the same for both sides) ------------------------------------------------

def make_batches(config, args, count: int) -> tuple[list[dict], str]:
  from medjax.data import pipeline
  recipe = pipeline.recipe(config)
  phantom_grid = tuple(config.data.phantom.shape[:2])
  use_phantom = args.data == "phantom" or (
      args.data == "auto" and config.data.kind == "phantom" and args.size is None)
  if use_phantom:
    it = iter(pipeline.train_dataset(config))
    batches = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(count)]
    return batches, f"phantom ({phantom_grid[0]}x{phantom_grid[1]}, train_dataset)"
  rng = np.random.default_rng(0)
  record, b = recipe.example_record(), config.train.batch_size
  batches = []
  for _ in range(count):
    batch = {}
    for key, value in record.items():
      if value.dtype == np.float32:
        batch[key] = rng.uniform(-1, 1, (b, *value.shape)).astype(np.float32)
      else:
        batch[key] = np.zeros((b, *value.shape), value.dtype)
    batch["mask"] = (batch["mask"] > 0).astype(np.float32)
    batches.append(batch)
  return batches, "random (fixed, uniform [-1, 1])"


# --- medjax -------------------------------------------------------------------------------

class MedjaxStep:
  """medjax's jitted, donated train step over the default mesh, and what XLA says of it."""

  def __init__(self, config, batches, variant: str | None = None):
    import jax

    from medjax import parallel, run, train, translators
    from medjax.data import pipeline
    self.jax = jax
    self.config = config
    mesh = (parallel.mesh_for(config) if hasattr(parallel, "mesh_for")
            else parallel.make_mesh())
    self.devices = mesh.size
    with patched(variant):  # a variant changes the model as it is traced, nothing else
      self.translator = translator = translators.build(config)
      abstract, init = run.create_state(translator, config, mesh, pipeline.recipe(config))
      self.step_fn = train.make_train_step(translator, mesh, abstract)
      self.state = init()
      self.batches = [parallel.global_batch(b, mesh) for b in batches]
      self.rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                                parallel.replicated(mesh))
      leaves = jax.tree_util.tree_flatten_with_path(self.state.params)[0]
      self.params = sum(int(np.prod(x.shape)) for _, x in leaves)
      # Each ResBlock's projection of the time embedding (FiLM: 2 × channels outputs).
      self.time_proj_params = sum(
          int(np.prod(x.shape)) for path, x in leaves
          if re.search(r"ResBlock_\d+'\]\['Dense_", jax.tree_util.keystr(path)))
      self.device = jax.devices()[0]
      t0 = time.perf_counter()
      self.compiled = self.step_fn.lower(self.state, self.batches[0], self.rng).compile()
      self.compile_s = time.perf_counter() - t0
      self.i = 0
      self.dispatch = []  # seconds until the jitted call returns (host work per step)
      self.first_loss = self.loss(self.step())  # traced here, under the variant's patch
    self.i = 0

  def step(self):
    t0 = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batches[self.i % len(self.batches)],
                                       self.rng)
    self.dispatch.append(time.perf_counter() - t0)
    self.i += 1
    self.jax.block_until_ready((self.state, metrics))
    return metrics

  def flops(self) -> float | None:
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
      cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    # cost_analysis describes one device's program: the global step is `devices` of them.
    return float(value) * self.devices if value is not None and value > 0 else None

  def memory(self) -> dict:
    out = {}
    try:
      stats = self.compiled.memory_analysis()
      fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
      out = {f: int(getattr(stats, f)) for f in fields if hasattr(stats, f)}
      # Arguments + outputs not aliased to a donated argument + XLA's temporary buffers
      # (buffer assignment's whole heap: an upper bound of what is live at once). XLA:CPU's
      # `peak_memory_in_bytes` leaves the temporaries out, so it is not used alone.
      out["compiled_peak_bytes"] = int(max(
          out.get("peak_memory_in_bytes", 0),
          out["argument_size_in_bytes"] + out["output_size_in_bytes"]
          - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]))
    except Exception as error:  # noqa: BLE001 (a backend without it)
      out["error"] = repr(error)
    if self.device.platform != "cpu":
      stats = self.device.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    out["peak_bytes"] = out.get("device_peak_bytes", out.get("compiled_peak_bytes"))
    return out

  def loss(self, metrics) -> float:
    return float(self.jax.device_get(metrics)["loss"])


# --- variants: medjax changes measured without editing medjax (docs/cpu_profile.md) -------

def two_stage_group_norm():
  """`layers.group_norm` with the statistics reduced in two stages — per-channel sums over
  H·W (a contiguous, vectorisable reduction), then over each group's channels — and the
  normalisation folded into one multiply-add per element. Same parameters (`scale`,
  `bias` of `GroupNorm_k`), same formula (E[x²] − E[x]², flax's fast variance), different
  summation order: equal to flax's GroupNorm up to float rounding (≈ 1e-6), not bitwise."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class GroupNorm(nn.Module):  # the class name keeps the parameter paths GroupNorm_k
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = jnp.float32  # of the result; statistics in float32, as flax's

    @nn.compact
    def __call__(self, x):
      out_dtype = self.dtype
      x = x.astype(jnp.float32)
      *lead, channels = x.shape
      groups, per_group = self.num_groups, channels // self.num_groups
      scale = self.param("scale", nn.initializers.ones, (channels,))
      bias = self.param("bias", nn.initializers.zeros, (channels,))
      axes = tuple(range(1, x.ndim - 1))
      batch = lead[0]
      s1 = jnp.sum(x, axis=axes).reshape(batch, groups, per_group).sum(-1)
      s2 = jnp.sum(x * x, axis=axes).reshape(batch, groups, per_group).sum(-1)
      count = math.prod(lead[1:]) * per_group
      mean = s1 / count
      var = jnp.maximum(s2 / count - mean * mean, 0.0)
      a = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), per_group, axis=1) * scale
      b = bias - jnp.repeat(mean, per_group, axis=1) * a
      shape = (batch,) + (1,) * len(axes) + (channels,)
      return (x * a.reshape(shape) + b.reshape(shape)).astype(out_dtype)

  def group_norm(channels: int, num_groups: int = 32, name: str | None = None,
                 dtype: Any = jnp.float32):
    return GroupNorm(num_groups=math.gcd(num_groups, channels), epsilon=1e-5, name=name,
                     dtype=dtype)
  return group_norm


def group_norm_vjp():
  """`two_stage_group_norm` with torch's analytic backward (`custom_vjp`): the gradient
  needs two per-channel sums (of dy and dy·x) and one elementwise pass,
  dx = dy·α[n,c] + x·β[n,g] + γ[n,g], instead of what autodiff makes of the forward."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  def stats(x, groups, eps):
    batch, channels = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    per_group = channels // groups
    count = math.prod(x.shape[1:-1]) * per_group
    s1 = jnp.sum(x, axis=axes).reshape(batch, groups, per_group).sum(-1)
    s2 = jnp.sum(x * x, axis=axes).reshape(batch, groups, per_group).sum(-1)
    mean = s1 / count
    var = jnp.maximum(s2 / count - mean * mean, 0.0)
    return mean, jax.lax.rsqrt(var + eps), count, axes, per_group

  def bcast(v, x):  # (N, C) → broadcastable against x
    return v.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
  def gn(x, scale, bias, groups, eps):
    return gn_fwd(x, scale, bias, groups, eps)[0]

  def gn_fwd(x, scale, bias, groups, eps):
    mean, rstd, _, _, per_group = stats(x, groups, eps)
    a = jnp.repeat(rstd, per_group, axis=1) * scale
    b = bias - jnp.repeat(mean, per_group, axis=1) * a
    return x * bcast(a, x) + bcast(b, x), (x, scale, mean, rstd)

  def gn_bwd(groups, eps, residuals, dy):
    x, scale, mean, rstd = residuals
    batch, channels = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    per_group = channels // groups
    count = math.prod(x.shape[1:-1]) * per_group
    rep = lambda v: jnp.repeat(v, per_group, axis=1)  # (N, G) → (N, C)
    s_dy = jnp.sum(dy, axis=axes)                      # (N, C)
    s_dyx = jnp.sum(dy * x, axis=axes)                 # (N, C)
    mean_c, rstd_c = rep(mean), rep(rstd)
    dbias = jnp.sum(s_dy, axis=0)
    dscale = jnp.sum(rstd_c * (s_dyx - mean_c * s_dy), axis=0)
    group_sum = lambda v: v.reshape(batch, groups, per_group).sum(-1)
    a_sum = group_sum(scale * s_dy)                                 # Σ_g dx̂
    b_sum = group_sum(scale * rstd_c * (s_dyx - mean_c * s_dy))     # Σ_g dx̂·x̂
    alpha = rstd_c * scale
    beta = rep(-rstd * rstd * b_sum / count)
    gamma = rep(rstd * (-a_sum / count) + mean * rstd * rstd * b_sum / count)
    dx = dy * bcast(alpha, x) + x * bcast(beta, x) + bcast(gamma, x)
    return dx, dscale, dbias

  gn.defvjp(gn_fwd, gn_bwd)

  class GroupNorm(nn.Module):  # the class name keeps the parameter paths GroupNorm_k
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
      channels = x.shape[-1]
      scale = self.param("scale", nn.initializers.ones, (channels,))
      bias = self.param("bias", nn.initializers.zeros, (channels,))
      y = gn(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon)
      return y.astype(self.dtype)

  def group_norm(channels: int, num_groups: int = 32, name: str | None = None,
                 dtype: Any = jnp.float32):
    return GroupNorm(num_groups=math.gcd(num_groups, channels), epsilon=1e-5, name=name,
                     dtype=dtype)
  return group_norm


VARIANTS = {"groupnorm": ("two-stage GroupNorm statistics", two_stage_group_norm),
            "groupnorm-vjp": ("two-stage GroupNorm statistics + analytic backward",
                              group_norm_vjp)}


@contextlib.contextmanager
def patched(variant: str | None):
  if variant is None:
    yield
    return
  if variant not in VARIANTS:
    raise SystemExit(f"--variant {variant}: known {sorted(VARIANTS)}")
  from medjax.models import layers, unet
  saved = layers.group_norm, unet.group_norm
  layers.group_norm = unet.group_norm = VARIANTS[variant][1]()
  try:
    yield
  finally:
    layers.group_norm, unet.group_norm = saved


def parts(medjax: MedjaxStep, repeats: int) -> dict:
  """The step's pieces jitted alone (median ms): where the time goes by subtraction, and
  what a fused or flattened optimiser would save."""
  import jax
  import optax

  from medjax.translators import base
  tr, state, batch, rng = medjax.translator, medjax.state, medjax.batches[0], medjax.rng
  train = medjax.config.train
  loss = lambda p, b, r: tr.loss(p, b, r)[0]
  grads = jax.jit(jax.grad(loss))(state.params, batch, rng)

  def adamw(tx):
    def update(g, o, p):
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o
    return update

  def ema(e, p, step):
    return base.ema_update(e, p, train.ema_decay, step)

  def opt_ema(g, o, p, e, step):
    p, o = adamw(tr.tx)(g, o, p)
    return p, o, ema(e, p, step)

  # optax.flatten: AdamW on one concatenated vector (clipping's global norm as before).
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, train.learning_rate, min(train.warmup_steps, max(train.total_steps - 1, 0)),
      max(train.total_steps, 1), 0.01 * train.learning_rate)
  flat_tx = optax.chain(optax.clip_by_global_norm(train.grad_clip),
                        optax.flatten(optax.adamw(schedule, weight_decay=train.weight_decay)))
  flat_state = flat_tx.init(state.params)

  def flat_opt_ema(g, o, p, e, step):
    p, o = adamw(flat_tx)(g, o, p)
    return p, o, ema(e, p, step)

  def norm(g):
    return optax.tree.norm(g)

  pieces = {
      "forward (loss)": (jax.jit(loss), (state.params, batch, rng)),
      "forward + backward (value_and_grad)": (
          jax.jit(jax.value_and_grad(loss)), (state.params, batch, rng)),
      "clip + AdamW + apply (optax, 182 leaves)": (
          jax.jit(adamw(tr.tx)), (grads, state.opt_state, state.params)),
      "EMA alone": (jax.jit(ema), (state.ema_params, state.params, state.step)),
      "clip + AdamW + EMA in one jit (as in the step)": (
          jax.jit(opt_ema), (grads, state.opt_state, state.params, state.ema_params,
                             state.step)),
      "  the same with optax.flatten(adamw)": (
          jax.jit(flat_opt_ema), (grads, flat_state, state.params, state.ema_params,
                                  state.step)),
      "grad_norm metric alone": (jax.jit(norm), (grads,)),
  }
  out = {}
  log(f"\nparts (each jitted alone, median of {repeats}; load {load_avg()}):")
  for name, (fn, args) in pieces.items():
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    out[name] = round(1e3 * statistics.median(times), 2)
    log(f"  {out[name]:8.2f} ms  {name}")
  steps = medjax.dispatch[-repeats:]
  out["jitted step call returns after (host dispatch)"] = round(
      1e3 * statistics.median(steps), 2) if steps else None
  log(f"  {out['jitted step call returns after (host dispatch)']} ms  the step's jitted call "
      "returns after (host dispatch, median over the timed steps)")
  return out


# --- MONAI --------------------------------------------------------------------------------

def torch_available() -> str | None:
  try:
    import einops  # noqa: F401  (MONAI's attention blocks need it; an optional MONAI dep)
    import monai  # noqa: F401
    import torch  # noqa: F401
  except ImportError as error:
    return (f"torch/monai not installed ({error.name}): reporting medjax alone "
            "(pip install -e '.[bench]' adds them)")
  return None


def monai_unet(config, source_channels: int, target_channels: int):
  """`DiffusionModelUNet` of medjax's U-Net widths (medjax/models/unet.py)."""
  from monai.networks.nets import DiffusionModelUNet
  model = config.model
  if model.name != "unet":
    raise SystemExit(f"the MONAI side mirrors medjax's U-Net only, not model.name={model.name}")
  channels = [model.channels * m for m in model.channel_mult]
  groups = 32
  for c in set(channels) | {c1 + c2 for c1 in channels for c2 in channels}:
    groups = math.gcd(groups, c)
  return DiffusionModelUNet(
      spatial_dims=2, in_channels=target_channels + source_channels, out_channels=1,
      channels=channels,
      attention_levels=[i in tuple(model.attention_levels) for i in range(len(channels))],
      num_res_blocks=model.num_res_blocks,
      # medjax: `num_heads` heads at every attention level; MONAI counts channels per head.
      num_head_channels=[c // model.num_heads for c in channels],
      norm_num_groups=groups, norm_eps=1e-5)  # medjax's GroupNorm: eps 1e-5


def lr_lambda(train):
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, 0.01·peak) / peak."""
  warmup = min(train.warmup_steps, max(train.total_steps - 1, 0))
  decay = max(train.total_steps, 1)

  def factor(step):
    if warmup and step < warmup:
      return step / warmup
    progress = min(max(step - warmup, 0) / max(decay - warmup, 1), 1.0)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
  return factor


class MonaiStep:
  def __init__(self, config, batches, dtype: str, optim: str, threads: int):
    import torch
    self.torch = torch
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.dtype = dtype
    train = config.train
    self.train = train
    as_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    self.batches = [(as_nchw(b["source"]).to(self.device), as_nchw(b["target"]).to(self.device))
                    for b in batches]
    source_channels = batches[0]["source"].shape[-1]
    target_channels = batches[0]["target"].shape[-1]
    self.model = monai_unet(config, source_channels, target_channels).to(self.device)
    self.params = sum(p.numel() for p in self.model.parameters())
    # Each resnet block's projection of the time embedding (added: 1 × channels outputs).
    self.time_proj_params = sum(p.numel() for n, p in self.model.named_parameters()
                                if "time_emb_proj" in n)
    params = list(self.model.parameters())
    kwargs = {"foreach": True} if optim == "foreach" else {"fused": True} if optim == "fused" else {}
    self.opt = torch.optim.AdamW(params, lr=train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=train.weight_decay, **kwargs)
    self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(train))
    self.ema = [p.detach().clone() for p in params]
    self.param_list = params
    self.scaler = (torch.amp.GradScaler(self.device.type)
                   if dtype == "float16" else None)
    self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    self.time_scale = 1000.0  # medjax's UNet.time_scale: t in [0, 1] → [0, 1000]
    self.step_count = 0
    self.i = 0
    self.profiling = False

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def _forward_loss(self, source, target):
    torch = self.torch
    b = target.shape[0]
    t = torch.sigmoid(torch.randn(b, device=self.device))
    noise = torch.randn_like(target)
    tb = t[:, None, None, None]
    x_t = (1.0 - tb) * noise + tb * target
    ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
           if self.autocast_dtype is not None else contextlib.nullcontext())
    with ctx:
      velocity = self.model(torch.cat([x_t, source], dim=1), timesteps=t * self.time_scale)
    return torch.mean((velocity.float() - (target - noise)) ** 2)

  def step(self):
    torch = self.torch
    phase = self.phase
    source, target = self.batches[self.i % len(self.batches)]
    self.i += 1
    self.model.train()
    with phase("forward"):
      loss = self._forward_loss(source, target)
    self.opt.zero_grad(set_to_none=True)
    with phase("backward"):
      if self.scaler is not None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
      else:
        loss.backward()
    with phase("clip + AdamW"):
      grad_norm = torch.nn.utils.clip_grad_norm_(self.param_list, self.train.grad_clip,
                                                 foreach=True)
      if self.scaler is not None:
        self.scaler.step(self.opt)
        self.scaler.update()
      else:
        self.opt.step()
      self.schedule.step()
    with phase("EMA"), torch.no_grad():
      step = self.step_count
      decay = min(self.train.ema_decay, (1.0 + step) / (10.0 + step))
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.param_list], 1.0 - decay)
    self.step_count += 1
    self.sync()
    return loss, grad_norm

  def phase(self, name):
    if not self.profiling:
      return contextlib.nullcontext()
    return self.torch.profiler.record_function(f"phase: {name}")

  def profile(self, steps: int) -> dict:
    """torch.profiler over `steps` steps: time per phase and per kind of aten op."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    self.profiling = True
    try:
      with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
          self.step()
        wall = time.perf_counter() - t0
    finally:
      self.profiling = False
    phases, kinds = {}, {}
    for event in prof.key_averages():
      if event.key.startswith("phase: "):
        phases[event.key[7:]] = event.cpu_time_total / 1e6
      elif event.key.startswith("aten::"):
        kind = torch_op_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(kinds.values())
    log(f"\nMONAI profile: {steps} steps in {wall:.2f} s wall ({1e3 * wall / steps:.0f} ms/step)"
        f"; load {load_avg()}")
    log("  ms/step  phase (torch.profiler record_function, CPU time incl. children)")
    for name, seconds in phases.items():
      log(f"  {1e3 * seconds / steps:7.1f}  {name}")
    log("  ms/step   share  kind of aten op (self CPU time)")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
      log(f"  {1e3 * seconds / steps:7.1f}  {100 * seconds / total:5.1f} %  {kind}")
    return {"wall_s": wall, "steps": steps,
            "ms_per_step_by_phase": {k: round(1e3 * v / steps, 2) for k, v in phases.items()},
            "ms_per_step_by_kind": {k: round(1e3 * v / steps, 2) for k, v in kinds.items()}}

  def flops(self) -> float | None:
    """Forward + backward FLOPs of one step by torch's counter (convs, matmuls, attention)."""
    try:
      from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
      return None
    source, target = self.batches[0]
    counter = FlopCounterMode(display=False)
    with counter:
      loss = self._forward_loss(source, target)
      loss.backward()
    self.opt.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())

  def memory(self) -> dict:
    torch = self.torch
    out = {}
    if self.device.type == "cuda":
      out["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
      out["peak_bytes"] = out["device_peak_bytes"]
      return out
    # CPU: what the step holds at its peak, estimated (no tracemalloc: torch's allocator is
    # not Python's) = tensors saved for backward + weights, grads, Adam m and v, EMA.
    saved = {}

    def pack(tensor):
      storage = tensor.untyped_storage()
      saved[storage.data_ptr()] = storage.nbytes()
      return tensor

    source, target = self.batches[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
      loss = self._forward_loss(source, target)
    loss.backward()
    self.opt.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in self.param_list)
    out["saved_activation_bytes"] = int(sum(saved.values()))
    out["state_bytes"] = int(5 * param_bytes)
    out["estimated_peak_bytes"] = out["saved_activation_bytes"] + out["state_bytes"]
    out["peak_bytes"] = out["estimated_peak_bytes"]
    return out


TORCH_OP_KINDS = (
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "mkldnn_convolution", "_convolution")),
    ("GroupNorm backward", ("native_group_norm_backward",)),
    ("GroupNorm forward", ("native_group_norm", "group_norm")),
    ("matmul (attention, linear)", ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear")),
    ("softmax", ("_softmax", "_softmax_backward_data", "softmax")),
    ("optimizer + EMA (foreach)", ("_foreach_", "addcmul_", "addcdiv_", "lerp_", "sqrt",
                                   "_fused_adamw_")),
    ("copies / layout", ("copy_", "clone", "contiguous", "cat", "to", "_to_copy")),
)


def torch_op_kind(key: str) -> str:
  name = key[len("aten::"):]
  for kind, names in TORCH_OP_KINDS:
    if name in names or any(name.startswith(n) for n in names if n.endswith("_")):
      return kind
  return "elementwise / other (SiLU, add, mul, sum, upsample, …)"


# --- timing -------------------------------------------------------------------------------

def time_steps(step, steps: int, warmup: int) -> tuple[list[float], float]:
  """Wall time of each step, and the cores the process kept busy meanwhile (CPU / wall)."""
  for _ in range(warmup):
    step()
  times = []
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  busy = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(steps, 1)
  return times, busy, faults


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower() and dtype in peaks:
      return peaks[dtype], name
  return None, None


def fmt_bytes(n) -> str:
  return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


# --- profile ------------------------------------------------------------------------------

def parse_hlo(text: str) -> dict:
  """Entry instructions of an optimised HLO module → (opcode, operands, body text)."""
  computations, current, body = {}, None, []
  entry, entry_name = [], None
  for line in text.splitlines():
    header = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
    if header and line.rstrip().endswith("{"):
      current, body = header.group(2), []
      if header.group(1):
        entry_name = current
      continue
    if line.startswith("}"):
      if current is not None:
        computations[current] = "\n".join(body)
      current = None
      continue
    if current is not None:
      body.append(line)
      if current == entry_name:
        entry.append(line)
  instructions = {}
  for line in entry:
    match = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if not match:
      continue
    name, rest = match.groups()
    opcode = re.search(r"\s([a-z][\w\-]*)\(", " " + rest)
    calls = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", rest)
    text = line + "\n" + "\n".join(computations.get(c, "") for c in calls)
    operands = re.findall(r"%([\w.\-]+)", rest.split("calls=")[0])
    instructions[name] = (opcode.group(1) if opcode else "?", operands, text)
  # A fusion XLA:CPU hands to a library (YNNPACK's convolutions and dots) carries no
  # op_name: borrow its users' (the op it computes a piece of).
  users = {}
  for name, (_, operands, text) in instructions.items():
    for operand in operands:
      users.setdefault(operand, []).append(text.splitlines()[0])
  for name, (opcode, operands, text) in list(instructions.items()):
    if 'op_name="' not in text and name in users:
      borrowed = "\n".join(users[name])
      instructions[name] = (opcode, operands, text + "\n" + " ".join(
          f'op_name="{o}"' for o in re.findall(r'op_name="([^"]*)"', borrowed)))
  return instructions


def classify(name: str, opcode: str, operands, text: str) -> str:
  """Which part of the step an entry instruction (an XLA:CPU thunk) belongs to."""
  op_names = re.findall(r'op_name="([^"]*)"', text)
  if any(o.startswith("state_ema_params") for o in operands):
    return "EMA update"
  if any(o.startswith("state_opt_state") for o in operands):
    return "AdamW update (moments, weight decay, apply)"
  backward = any("transpose(jvp(" in o for o in op_names)
  forward = not backward and any("jvp(" in o for o in op_names)
  phase = "backward" if backward else "forward" if forward else None
  attention = any("AttentionBlock" in o for o in op_names)
  if "convolution(" in text:
    window = re.search(r"window=\{size=([\dx]+)", text)
    taps = math.prod(int(v) for v in window.group(1).split("x")) if window else 9
    # A kernel's gradient is a convolution whose window is the whole image (its op_name
    # may be borrowed from the gradient norm that reads it: the window decides).
    if taps > 9:
      return "backward: convolution (kernel gradient)"
  if phase is None:
    if opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
      return "other"
    return "outside the network (loss, rng, grad norm/clip, optimiser glue)"
  if "convolution(" in text:
    kind = "convolution"
  elif re.search(r"\sdot\(", text):
    kind = "attention matmul" if attention else "dense matmul (time embedding, FiLM)"
  elif any("GroupNorm" in o for o in op_names):
    kind = "GroupNorm"
  elif attention:
    kind = "attention softmax/reshape"
  elif name.startswith(("transpose", "copy")) or opcode in ("transpose", "copy"):
    kind = "layout transpose/copy"
  else:
    kind = "elementwise (SiLU, FiLM, residual, concat, resize)"
  return f"{phase}: {kind}"


def classify_all(instructions: dict) -> dict:
  """`classify` every instruction; a transpose/copy with no op_name of its own that feeds
  a convolution is that convolution's layout change (XLA:CPU's, not medjax's)."""
  kinds = {name: classify(name, *value) for name, value in instructions.items()}
  users = {}
  for name, (_, operands, _) in instructions.items():
    for operand in operands:
      users.setdefault(operand, []).append(name)
  for name, kind in list(kinds.items()):
    if kind.startswith("outside") and name.startswith(("transpose", "copy")):
      into = [kinds[u] for u in users.get(name, []) if "convolution" in kinds[u]]
      if into:
        kinds[name] = into[0].split(":")[0] + ": layout transpose/copy into convolutions"
  return kinds


def profile(medjax: MedjaxStep, directory: str, steps: int) -> dict:
  """Trace `steps` medjax steps with jax.profiler; sum XLA:CPU's thunk time by part of
  the step (each thunk is one entry instruction of the compiled HLO, classified by its
  op_name metadata, its fused computation and the state buffers it reads)."""
  import jax
  os.makedirs(directory, exist_ok=True)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(steps):
      medjax.step()
    wall = time.perf_counter() - t0
  traces = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*",
                                         "*.trace.json.gz")), key=os.path.getmtime)
  if not traces:
    log(f"profile: no trace JSON under {directory}")
    return {}
  with gzip.open(traces[-1]) as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  instructions = parse_hlo(medjax.compiled.as_text())
  kinds = classify_all(instructions)
  by_kind, by_name, thunks, dispatch = {}, {}, 0, 0.0
  for e in events:
    if e.get("ph") != "X":
      continue
    name, dur = e.get("name", ""), float(e.get("dur", 0)) / 1e6
    if name.startswith("PjitFunction("):
      dispatch += dur
    if name not in kinds:
      continue
    thunks += 1
    by_kind[kinds[name]] = by_kind.get(kinds[name], 0.0) + dur
    by_name[name] = by_name.get(name, 0.0) + dur
  total = sum(by_kind.values())
  log(f"\nprofile: {steps} steps in {wall:.2f} s wall ({1e3 * wall / steps:.0f} ms/step), "
      f"{thunks / steps:.0f} thunks/step, thunk time summed over threads "
      f"{1e3 * total / steps:.0f} ms/step, python dispatch {1e3 * dispatch / steps:.1f} ms/step;"
      f" load {load_avg()}; trace {traces[-1]}")
  log("  ms/step   share  part of the step")
  for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    log(f"  {1e3 * seconds / steps:7.1f}  {100 * seconds / total:5.1f} %  {kind}")
  log("  the 15 longest thunks (ms/step):")
  for name, seconds in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]:
    op = re.search(r'op_name="([^"]*)"', instructions[name][2])
    log(f"  {1e3 * seconds / steps:7.1f}  {name:28s} {kinds[name][:40]:40s} "
        f"{op.group(1)[-60:] if op else ''}")
  return {"trace": traces[-1], "wall_s": wall, "steps": steps,
          "thunks_per_step": thunks / steps,
          "ms_per_step_by_part": {k: round(1e3 * v / steps, 2) for k, v in by_kind.items()}}


# --- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Any config key: --config.KEY=VALUE (as medjax train).")
  parser.add_argument("--config", default=str(REPO / "experiments" / "phantom.py"),
                      metavar="FILE.py[:ARG]")
  parser.add_argument("--preset", choices=("default", "shards"), default="default",
                      help="shards: config.shards_config's U-Net widths and optimiser "
                           "(default size 256², batch 32)")
  parser.add_argument("--size", type=int, help="slice size (H = W); random batches")
  parser.add_argument("--batch", type=int, help="global batch")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="medjax: model.dtype (if this medjax has it); torch: autocast AMP")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per round and side")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each round")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating medjax/MONAI rounds (medians over all of them)")
  parser.add_argument("--data", choices=("auto", "phantom", "random"), default="auto")
  parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
  parser.add_argument("--threads", type=int, default=cores(),
                      help="torch.set_num_threads (default: this process's cores)")
  parser.add_argument("--torch-optim", choices=("foreach", "fused", "default"),
                      default="foreach", help="torch AdamW implementation")
  parser.add_argument("--only", choices=("both", "medjax", "monai"), default="both")
  parser.add_argument("--profile", metavar="DIR",
                      help="after timing, trace --profile-steps medjax steps into DIR")
  parser.add_argument("--profile-steps", type=int, default=5)
  parser.add_argument("--variant", choices=sorted(VARIANTS),
                      help="also time medjax with this change patched in at trace time "
                           "(alternating with the others; docs/cpu_profile.md)")
  parser.add_argument("--parts", action="store_true",
                      help="also time the step's pieces alone (forward, backward, "
                           "optimiser, EMA)")
  parser.add_argument("--host", choices=("medjax", "jax"), default="medjax",
                      help="medjax (default): the process set up as the medjax commands set "
                           "it up (medjax/host.py: glibc malloc kept from remapping XLA's "
                           "temporaries, one CPU device per core); jax: jax's defaults "
                           "(one CPU device, glibc's malloc), the issue's baseline. "
                           "Process-wide: MONAI's side runs under the same malloc")
  args, rest = parser.parse_known_args(argv)
  if args.host == "medjax":
    from medjax import host
    host.configure()
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r}")
    overrides.append(item[len("--config."):])

  config, medjax_dtype = build_config(args, overrides)
  description = describe_config(config, args)
  import jax
  device = jax.devices()[0]
  device_name = f"{device.platform}:{getattr(device, 'device_kind', '?')}"
  if device.platform == "cpu":
    device_name += f" ({cores()} cores)"
  log(f"config: {description}; dtype {args.dtype}; device {device_name}; "
      f"jax {jax.__version__}; load {load_avg()}")

  run_medjax = args.only in ("both", "medjax") and medjax_dtype is not None
  run_monai = args.only in ("both", "monai")
  if run_monai:
    missing = torch_available()
    if missing:
      log(missing)
      run_monai = False

  batches, data_name = make_batches(config, args, args.batches)
  log(f"data: {len(batches)} batches of {config.train.batch_size}, {data_name}")

  medjax = monai = variant = None
  if run_medjax:
    medjax = MedjaxStep(config, batches)
    log(f"medjax: {medjax.params:,} parameters, compiled in {medjax.compile_s:.1f} s")
    if args.variant:
      variant = MedjaxStep(config, batches, args.variant)
      log(f"medjax+{args.variant} ({VARIANTS[args.variant][0]}): {variant.params:,} parameters; "
          f"first-step loss {variant.first_loss:.7f} vs {medjax.first_loss:.7f}")
  if run_monai:
    import monai as monai_lib
    import torch
    monai = MonaiStep(config, batches, args.dtype, args.torch_optim, args.threads)
    log(f"MONAI {monai_lib.__version__} / torch {torch.__version__}: {monai.params:,} "
        f"parameters, {torch.get_num_threads()} threads, AdamW {args.torch_optim}, "
        f"device {monai.device}")
  if medjax and monai:
    gap = (medjax.params - monai.params) / monai.params
    rest_m, rest_t = (medjax.params - medjax.time_proj_params,
                      monai.params - monai.time_proj_params)
    log(f"parameters: medjax/MONAI = {medjax.params / monai.params:.4f} ({100 * gap:+.2f} %); "
        f"the res blocks' time projections are {medjax.time_proj_params:,} (FiLM scale+shift) "
        f"vs {monai.time_proj_params:,} (additive); without them {rest_m:,} vs {rest_t:,} "
        f"({100 * (rest_m - rest_t) / rest_t:+.3f} %)")

  times = {"medjax": [], "variant": [], "monai": []}
  cores_busy = {"medjax": [], "variant": [], "monai": []}
  loads = []
  b = config.train.batch_size
  for r in range(args.rounds):
    for name, side in (("medjax", medjax), ("variant", variant), ("monai", monai)):
      if side is None:
        continue
      before = load_avg()
      t, busy, faults = time_steps(side.step, args.steps, args.warmup)
      after = load_avg()
      loads += [before, after]
      times[name] += t
      cores_busy[name].append(busy)
      log(f"round {r + 1} {name:6s}: {b / statistics.median(t):8.2f} img/s "
          f"(median {1e3 * statistics.median(t):.1f} ms, min {1e3 * min(t):.1f}, "
          f"max {1e3 * max(t):.1f}; {busy:.2f} cores busy, {faults:.0f} page faults/step); "
          f"load {before} → {after}")

  result = {"medjax_img_per_s": None, "monai_img_per_s": None, "ratio": None,
            "peak_bytes": None, "flops_per_step": None, "mfu": None,
            "device": device_name, "dtype": args.dtype, "config": description,
            "load_avg": None, "host": args.host}
  if medjax:
    result["medjax_img_per_s"] = round(b / statistics.median(times["medjax"]), 2)
    result["medjax_best_img_per_s"] = round(b / min(times["medjax"]), 2)
    result["medjax_cores_busy"] = round(statistics.median(cores_busy["medjax"]), 2)
    result["medjax_params"] = medjax.params
    memory = medjax.memory()
    result["peak_bytes"] = memory.get("peak_bytes")
    result["medjax_memory"] = memory
    result["flops_per_step"] = medjax.flops()
    result["medjax_devices"] = medjax.devices
    if medjax.devices > 1:
      memory["note"] = "per device (the mesh's devices each hold these)"
    if device.platform != "cpu" and result["flops_per_step"]:
      peak, chip = peak_tflops(getattr(device, "device_kind", ""), args.dtype)
      if peak:
        achieved = result["flops_per_step"] * result["medjax_img_per_s"] / b
        result["mfu"] = round(achieved / (peak * 1e12 * medjax.devices), 4)
        result["mfu_peak_tflops"] = f"{chip} {args.dtype} dense {peak:g}"
    result["medjax_first_loss"] = medjax.first_loss
  if variant:
    result["variant"] = args.variant
    result["variant_img_per_s"] = round(b / statistics.median(times["variant"]), 2)
    result["variant_speedup"] = round(statistics.median(times["medjax"])
                                      / statistics.median(times["variant"]), 3)
    after = [np.asarray(x) for x in jax.tree.leaves(variant.state.params)]
    before = [np.asarray(x) for x in jax.tree.leaves(medjax.state.params)]
    result["variant_max_param_diff"] = float(max(np.max(np.abs(a - c))
                                                 for a, c in zip(after, before)))
    log(f"medjax+{args.variant}: {result['variant_img_per_s']} img/s, "
        f"{result['variant_speedup']}× medjax; after the same steps on the same batches the "
        f"parameters differ by at most {result['variant_max_param_diff']:.2e}")
  if medjax and args.parts:
    result["parts_ms"] = parts(medjax, max(args.steps // 2, 5))
  if monai:
    result["monai_img_per_s"] = round(b / statistics.median(times["monai"]), 2)
    result["monai_best_img_per_s"] = round(b / min(times["monai"]), 2)
    result["monai_cores_busy"] = round(statistics.median(cores_busy["monai"]), 2)
    result["monai_params"] = monai.params
    memory = monai.memory()
    memory["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["monai_peak_bytes"] = memory.get("peak_bytes")
    result["monai_memory"] = memory
    result["monai_flops_per_step"] = monai.flops()
    if monai.device.type == "cuda" and result["monai_flops_per_step"]:
      peak, _ = peak_tflops(torch.cuda.get_device_name(), args.dtype)
      if peak:
        achieved = result["monai_flops_per_step"] * result["monai_img_per_s"] / b
        result["monai_mfu"] = round(achieved / (peak * 1e12), 4)
  if medjax and monai:
    result["ratio"] = round(result["medjax_img_per_s"] / result["monai_img_per_s"], 3)
    result["params_ratio"] = round(medjax.params / monai.params, 4)
    result["params_ratio_without_time_projections"] = round(
        (medjax.params - medjax.time_proj_params) / (monai.params - monai.time_proj_params), 5)
  result["load_avg"] = round(statistics.median(loads), 2) if loads else load_avg()
  result["load_avg_range"] = [min(loads), max(loads)] if loads else None
  result["steps"] = {"timed_per_round": args.steps, "warmup": args.warmup,
                     "rounds": args.rounds}
  result["data"] = data_name
  result["medjax_tree"] = medjax_tree()

  log("")
  if medjax:
    log(f"medjax: {result['medjax_img_per_s']} img/s, peak {fmt_bytes(result['peak_bytes'])}, "
        f"{(result['flops_per_step'] or 0) / 1e9:.1f} GFLOP/step (XLA cost analysis)"
        + (f", MFU {100 * result['mfu']:.1f} % of {result['mfu_peak_tflops']}"
           if result["mfu"] is not None else ""))
  if monai:
    log(f"MONAI:  {result['monai_img_per_s']} img/s, peak {fmt_bytes(result['monai_peak_bytes'])}"
        f" ({'max_memory_allocated' if monai.device.type == 'cuda' else 'estimate'}), "
        f"{(result['monai_flops_per_step'] or 0) / 1e9:.1f} GFLOP/step (torch FlopCounterMode)")
  if result["ratio"] is not None:
    log(f"ratio medjax/MONAI: {result['ratio']}× (median load {result['load_avg']}, range "
        f"{result['load_avg_range']})")
  if medjax and args.profile:
    result["profile"] = profile(medjax, args.profile, args.profile_steps)
  if monai and args.profile:
    result["monai_profile"] = monai.profile(args.profile_steps)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
