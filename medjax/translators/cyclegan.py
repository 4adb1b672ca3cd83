"""CycleGAN (Zhu et al. 2017): unpaired translation between domain A (source) and B (target).

Two ResNet generators G: A → B and F: B → A, two unconditional PatchGANs D_A and D_B.
No loss compares G(a) with the b of its own slice, so the batches may be unpaired (the
pipeline's `data.unpaired` mode draws them from different subjects):

    L_G = L_adv,G(D_B(G(a))) + L_adv,G(D_A(F(b)))
          + λ_cyc (|F(G(a)) - a|₁ + |G(F(b)) - b|₁)
          + λ_cyc λ_id (|G(b) - b|₁ + |F(a) - a|₁)
    L_D = L_adv,D(D_B(b), D_B(pool_B(G(a)))) + L_adv,D(D_A(a), D_A(pool_A(F(b))))

The identity terms need A and B to have the same channels and are dropped otherwise. The
discriminators see generated images through a history pool (Shrivastava et al. 2017):
each new image either enters it (while it fills) or, with probability ½, swaps with a
random stored one, which is shown instead. The pools are arrays in the state, so the step
stays jittable and a checkpoint resumes them. Evaluation uses the EMA of G: one network
evaluation per image.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from medjax import models
from medjax.translators import base, gan


class CycleState(gan.GANState):
  pool_a: Any  # (pool_size, H, W, Cs) generated source-domain images (D, H, W in 3D)
  pool_b: Any  # (pool_size, H, W, 1) generated target-domain images
  pool_count: jax.Array  # how many of the slots are filled (the same for both pools)


def query_pool(pool, count, images, rng):
  """Zhu et al.'s ImagePool for a batch: (images to show D, new pool, new count).

  The batch is handled at once rather than image by image: while the pool fills, image i
  takes slot count + i; past that, each image swaps with probability ½ for a random slot
  filled earlier. Two images drawing the same slot both see its old occupant (one by one,
  the second would see the first), a difference of no consequence to D.
  """
  size, batch = pool.shape[0], images.shape[0]
  # The pool is state, replicated; the batch is split over the mesh's data axis. Gather the
  # (few) generated images first, so every device updates the same pool.
  images = _replicated(images)
  key_swap, key_index = jax.random.split(rng)
  slot = count + jnp.arange(batch)
  filling = slot < size
  # Swaps draw only from slots filled before this batch, never from ones it is filling.
  swap = (jax.random.uniform(key_swap, (batch,)) < 0.5) & (count > 0)
  index = jnp.where(filling, jnp.minimum(slot, size - 1),
                    jax.random.randint(key_index, (batch,), 0, jnp.maximum(count, 1)))
  shown = jnp.where(base.per_example(~filling & swap, images), pool[index], images)
  # Images that neither fill nor swap write nowhere: their index is pushed out of range.
  pool = pool.at[jnp.where(filling | swap, index, size)].set(images, mode="drop")
  return shown, pool, jnp.minimum(count + batch, size)


def _replicated(x):
  sharding = jax.typeof(x).sharding
  if getattr(sharding, "mesh", None) is None or sharding.mesh.empty or all(
      axis is None for axis in sharding.spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh,
                                                             jax.sharding.PartitionSpec()))


def _inputs(generator, image):
  # The ResNet generator takes the image alone; the U-Net and U-ViT take (x_t, t, source)
  # and, as in regression and pix2pix, see the source alone with x_t = t = None.
  return (image,) if isinstance(generator, models.ResNetGenerator) else (None, None, image)


class CycleGAN(gan.GANTranslator):
  name = "cyclegan"
  options = {**gan.GANTranslator.options,
             "lambda_cycle": (10.0, "weight of the cycle-consistency L1 terms"),
             "lambda_identity": (0.5, "weight of the identity terms, times lambda_cycle "
                                      "(as Zhu et al.)"),
             "pool_size": (50, "generated images kept in each history pool (0: no pool)")}
  inference_path = ("ema_params", "g")

  def __init__(self, config):
    super().__init__(config)
    cfg = config.translator
    if cfg.pool_size < 0:
      raise ValueError(f"translator.pool_size={cfg.pool_size} must be ≥ 0 (0: no pool)")
    self.pool_size = int(cfg.pool_size)
    self.lambda_cycle, self.lambda_identity = float(cfg.lambda_cycle), float(cfg.lambda_identity)

  def build_model(self, config):
    return models.build(config.model.name, out_channels=1, **self._backbone(config))

  @staticmethod
  def _backbone(config):
    return {k: v for k, v in config.model.to_dict().items() if k != "name"}

  def backward_model(self, channels: int):
    # F maps back to every source channel (modalities and any 2.5D context slices), so the
    # cycle a → G(a) → F(G(a)) closes; their number is only known from the data.
    return models.build(self.config.model.name, out_channels=channels,
                        **self._backbone(self.config))

  def generate(self, params, image, *, channels=None):
    """G(image), or F(image) back to `channels` source channels."""
    model = self.model if channels is None else self.backward_model(channels)
    return model.apply({"params": params}, *_inputs(model, image),
                       train=True).astype(jnp.float32)

  def judge(self, params, image):
    return self.discriminator.apply({"params": params}, image, train=True)

  def init(self, rng, batch) -> CycleState:
    keys = jax.random.split(rng, 4)
    source, target = batch["source"], batch["target"]
    backward = self.backward_model(source.shape[-1])
    params = {"g": self.model.init(keys[0], *_inputs(self.model, source), train=False)["params"],
              "f": backward.init(keys[1], *_inputs(backward, target), train=False)["params"]}
    disc_params = {"d_a": self.discriminator.init(keys[2], source, train=False)["params"],
                   "d_b": self.discriminator.init(keys[3], target, train=False)["params"]}
    pool = lambda x: jnp.zeros((max(self.pool_size, 1), *x.shape[1:]), jnp.float32)
    return self.new_state(params, disc_params, state_class=CycleState, pool_a=pool(source),
                          pool_b=pool(target), pool_count=jnp.zeros((), jnp.int32))

  def step_update(self, state: CycleState, batch, rng):
    rng_a, rng_b = jax.random.split(rng)
    real_a, real_b = batch["source"], batch["target"]
    channels = real_a.shape[-1]
    same_channels = channels == real_b.shape[-1]
    d = state.disc_params

    def g_loss(params):
      fake_b = self.generate(params["g"], real_a)
      fake_a = self.generate(params["f"], real_b, channels=channels)
      adv = (gan.generator_loss(self.gan_loss, self.judge(d["d_b"], fake_b))
             + gan.generator_loss(self.gan_loss, self.judge(d["d_a"], fake_a)))
      # With train.masked_loss the B-side terms count b's mask voxels only: an unpaired
      # batch's mask is its target's. The A-side terms have no mask of theirs: whole image.
      cycle = (jnp.mean(jnp.abs(self.generate(params["f"], fake_b, channels=channels) - real_a))
               + self.pixel_mean(jnp.abs(self.generate(params["g"], fake_a) - real_b), batch))
      identity = jnp.zeros(())
      if same_channels and self.lambda_identity > 0:
        identity = (self.pixel_mean(jnp.abs(self.generate(params["g"], real_b) - real_b), batch)
                    + jnp.mean(jnp.abs(self.generate(params["f"], real_a, channels=channels)
                                       - real_a)))
      total = adv + self.lambda_cycle * (cycle + self.lambda_identity * identity)
      return total, (fake_a, fake_b, adv, cycle, identity)

    (loss, (fake_a, fake_b, adv, cycle, identity)), g_grads = jax.value_and_grad(
        g_loss, has_aux=True)(state.params)
    fake_a, fake_b = jax.lax.stop_gradient(fake_a), jax.lax.stop_gradient(fake_b)
    pool_a, pool_b, count = state.pool_a, state.pool_b, state.pool_count
    if self.pool_size:
      fake_a, pool_a, _ = query_pool(pool_a, count, fake_a, rng_a)
      fake_b, pool_b, count = query_pool(pool_b, count, fake_b, rng_b)

    def d_loss(disc_params):
      return (gan.discriminator_loss(self.gan_loss, self.judge(disc_params["d_a"], real_a),
                                     self.judge(disc_params["d_a"], fake_a))
              + gan.discriminator_loss(self.gan_loss, self.judge(disc_params["d_b"], real_b),
                                       self.judge(disc_params["d_b"], fake_b)))

    disc_loss, d_grads = jax.value_and_grad(d_loss)(state.disc_params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm((g_grads, d_grads)),
               "g_adv": adv, "cycle": cycle, "identity": identity, "d_loss": disc_loss}
    return self.update(state, g_grads, d_grads, pool_a=pool_a, pool_b=pool_b,
                       pool_count=count), metrics
