"""Autoencoders as translators: the first stage of latent and token translators.

An autoencoder run is an ordinary run whose data has source == target modality
(`experiments/phantom_vae.py`); it learns x ≈ decode(encode(x)) on the target images, and
its `translate(params, source)` is that reconstruction, so its own evaluation is the
reconstruction ceiling of every second stage built on it (docs/design.md, "Autoencoders
and latent translators"). Deterministic: one decoder evaluation per image.

  vae    KL-regularised (Rombach et al. 2022): z = μ + σ ε, loss
         |decode(z) - x|₁ + kl_weight · KL(N(μ, σ²) ‖ N(0, I)),
         the L1 a mean over image voxels and the KL summed over the latent elements of an
         example and divided by its image voxels — the ratio of LDM's per-example sums,
         so LDM's kl_weight = 1e-6 means the same here.
  vqvae  vector-quantised (van den Oord et al. 2017): decode(q(encode(x))) with
         l2-normalised codes and the straight-through estimator
         (`models.autoencoder.vector_quantize`), loss |·|₁ + codebook + β · commitment;
         codebook perplexity and dead codes are logged.

With `translator.adversarial` > 0 a PatchGAN (gan.py's, judging the image alone, hinge
loss) adds that weight times its generator loss (VQGAN's patch-adversarial term).

Inference parameters, what second stages read: {"net": EMA of the autoencoder,
"latent_std": the running std of the vae's posterior means}. The second stage's latents
are μ / latent_std, unit variance (Stable Diffusion's scale factor, estimated while
training and checkpointed with the weights instead of measured afterwards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medjax import modalities, models
from medjax.models import autoencoder as ae
from medjax.translators import base, gan

NET, LATENT_STD = "net", "latent_std"
# Decay of the running latent std (with the EMA's warm-up, so it leaves its initial 1
# within the first steps).
LATENT_STD_DECAY = 0.99


class AutoEncoding(base.Translator):
  """What vae and vqvae share: the network, the optional discriminator, the train step."""

  stochastic = False
  codebook_size = 0
  options = {
      "adversarial": (0.0, "weight of a PatchGAN's hinge generator loss on the "
                           "reconstruction (0: none)"),
      "discriminator": ({"channels": 32, "num_layers": 3, "norm": "instance"},
                        "the PatchGAN when adversarial > 0 (keys as model 'patchgan')"),
  }

  def __init__(self, config):
    if config.model.name != "autoencoder":
      raise ValueError(f"translator.name={self.name!r} trains model.name='autoencoder', "
                       f"not {config.model.name!r}")
    sources = modalities.as_tuple(config.data.source)
    if sources != (config.data.target,):
      raise ValueError(f"translator.name={self.name!r} reconstructs its input: data.source "
                       f"must be data.target ({config.data.target}), got {list(sources)}")
    super().__init__(config)
    if self.registration is not None:
      raise ValueError(f"train.registration={config.train.registration!r}: an autoencoder "
                       "reconstructs its own input, there is nothing to register")
    self.adversarial = float(config.translator.adversarial)
    if self.adversarial < 0:
      raise ValueError(f"translator.adversarial={self.adversarial} must be ≥ 0")
    self.discriminator = None
    if self.adversarial > 0:
      self.discriminator = models.build(
          "patchgan", dtype=config.model.get("dtype", "float32"),
          dims=config.model.get("dims", 2), **config.translator.discriminator.to_dict())
      self.disc_tx = base.make_optimizer(config.train)
    self.factor = 2 ** (len(config.model.channels) - 1)
    self.latent_channels = int(config.model.latent_channels)

  def build_model(self, config):
    model = config.model.to_dict()
    model.pop("name")
    return models.build("autoencoder", out_channels=1, codebook_size=self.codebook_size,
                        **model)

  def _call(self, params, x, method):
    return self.model.apply({"params": params}, x, method=method)

  def image(self, source):
    """The image an autoencoder reads from a model input: its centre channel (2.5D
    context aside; the source is the target's modality)."""
    centre = source.shape[-1] // 2
    return source[..., centre:centre + 1]

  # -- the protocol ------------------------------------------------------------
  def init(self, rng, batch):
    rng, rng_d = jax.random.split(rng)
    x = batch["target"]
    params = self.model.init(rng, x)["params"]
    ema = {NET: params, **self.extra_state()}
    state = base.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                            opt_state=self.tx.init(params))
    if self.discriminator is None:
      return state
    disc = self.discriminator.init(rng_d, x, train=False)["params"]
    return gan.GANState(step=state.step, params=params, ema_params=ema,
                        opt_state=state.opt_state, disc_params=disc,
                        disc_opt_state=self.disc_tx.init(disc))

  def extra_state(self) -> dict:
    return {}

  def objective(self, params, batch, rng):
    """(reconstruction, loss without the adversarial term, metrics, state updates)."""
    raise NotImplementedError

  def step_update(self, state, batch, rng):

    def loss_fn(params):
      recon, loss, metrics, updates = self.objective(params, batch, rng)
      if self.discriminator is not None:
        logits = self.discriminator.apply({"params": state.disc_params}, recon, train=True)
        adv = gan.generator_loss("hinge", logits)
        loss = loss + self.adversarial * adv
        metrics = {**metrics, "g_adv": adv}
      return loss, (recon, metrics, updates)

    (loss, (recon, metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    step_updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, step_updates)
    decay, step = self.config.train.ema_decay, state.step
    ema = {NET: base.ema_update(state.ema_params[NET], params, decay, step)}
    for key, value in updates.items():  # running statistics, averaged like the EMA
      ema[key] = base.ema_update(state.ema_params[key], value, LATENT_STD_DECAY, step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    changes = dict(step=step + 1, params=params, ema_params=ema, opt_state=opt_state)
    if self.discriminator is not None:
      real, fake = batch["target"], jax.lax.stop_gradient(recon)

      def d_loss(disc):
        judge = lambda x: self.discriminator.apply({"params": disc}, x, train=True)
        return gan.discriminator_loss("hinge", judge(real), judge(fake))

      metrics["d_loss"], d_grads = jax.value_and_grad(d_loss)(state.disc_params)
      d_updates, disc_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state,
                                                       state.disc_params)
      changes.update(disc_params=optax.apply_updates(state.disc_params, d_updates),
                     disc_opt_state=disc_opt_state)
    return state.replace(**changes), metrics

  def translate(self, params, source, rng=None, *, steps=None, samples=1):
    """The reconstruction of the source (the target's modality): one pass, zero std."""
    out = jnp.clip(self.decode(params, self.encode(params, self.image(source))), -1.0, 1.0)
    return out, jnp.zeros_like(out)

  # -- what second stages call, with these inference params --------------------
  def encode(self, params, images):
    raise NotImplementedError

  def decode(self, params, latents):
    raise NotImplementedError


class VAE(AutoEncoding):
  name = "vae"
  options = {"kl_weight": (1e-6, "weight of the KL term: per-example KL sum over image "
                                 "voxels against the voxel-mean L1 (LDM's 1e-6)"),
             **AutoEncoding.options}

  def __init__(self, config):
    super().__init__(config)
    self.kl_weight = float(config.translator.kl_weight)
    if self.kl_weight < 0:
      raise ValueError(f"translator.kl_weight={self.kl_weight} must be ≥ 0")

  def extra_state(self):
    return {LATENT_STD: jnp.ones((), jnp.float32)}

  def objective(self, params, batch, rng):
    x = batch["target"]
    mean, logvar = self._call(params, x, "encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = self._call(params, z, "decode")
    l1 = self.pixel_mean(jnp.abs(recon - x), batch)
    kl = kl_divergence(mean, logvar, voxels=x[0].size)
    std = jnp.std(jax.lax.stop_gradient(mean))
    return recon, l1 + self.kl_weight * kl, {"l1": l1, "kl": kl, "latent_std": std}, \
        {LATENT_STD: std}

  def encode(self, params, images):
    """Unit-variance latents: the posterior mean over the running latent std."""
    mean, _ = self._call(params[NET], images, "encode")
    return mean / params[LATENT_STD]

  def decode(self, params, latents):
    return self._call(params[NET], latents * params[LATENT_STD], "decode")


class VQVAE(AutoEncoding):
  name = "vqvae"
  options = {"codebook_size": (512, "codes K in the codebook"),
             "beta": (0.25, "weight β of the commitment loss (VQ-VAE)"),
             **AutoEncoding.options}

  def __init__(self, config):
    self.codebook_size = int(config.translator.codebook_size)
    if self.codebook_size < 2:
      raise ValueError(f"translator.codebook_size={self.codebook_size} must be ≥ 2")
    super().__init__(config)
    self.beta = float(config.translator.beta)
    if self.beta < 0:
      raise ValueError(f"translator.beta={self.beta} must be ≥ 0")

  def objective(self, params, batch, rng):
    x = batch["target"]
    z_q, _, terms = ae.vector_quantize(self._call(params, x, "encode"), params["codebook"],
                                       beta=self.beta)
    recon = self._call(params, z_q, "decode")
    l1 = self.pixel_mean(jnp.abs(recon - x), batch)
    metrics = {"l1": l1, **{k: v for k, v in terms.items() if k != "loss"}}
    return recon, l1 + terms["loss"], metrics, {}

  def encode(self, params, images):
    """The quantised latents (unit-norm codes)."""
    z_q, _, _ = ae.vector_quantize(self._call(params[NET], images, "encode"),
                                   params[NET]["codebook"], beta=self.beta)
    return z_q

  def decode(self, params, latents):
    return self._call(params[NET], latents, "decode")

  def tokens(self, params, images):
    """The code index of every latent position: int32 (B, h, w[, d])."""
    _, indices, _ = ae.vector_quantize(self._call(params[NET], images, "encode"),
                                       params[NET]["codebook"], beta=self.beta)
    return indices

  def decode_tokens(self, params, tokens):
    return self.decode(params, ae.lookup(params[NET]["codebook"], tokens))


def kl_divergence(mean, logvar, voxels: int):
  """KL(N(mean, e^logvar) ‖ N(0, I)) summed over each example's latent elements, divided
  by its image `voxels`, averaged over the batch."""
  per = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(jnp.sum(per.reshape(per.shape[0], -1), -1)) / voxels
