"""Backbones: shapes, closed-form properties at init, conditioning, receptive field, registry,
volumes (model.dims=3) and the ResEnc decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.models import MODELS, PatchGAN, ResNetGenerator, UNet, build
from medjax.models.patchgan import receptive_field

TINY_UNET = dict(out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), num_heads=2)
BATCH, SIZE = 2, 16


def _inputs(seed=0, size=SIZE):
  k_x, k_s, k_t = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k_x, (BATCH, size, size, 1))
  source = jax.random.normal(k_s, (BATCH, size, size, 2))
  t = jax.random.uniform(k_t, (BATCH,))
  return x, t, source


def _key(seed):
  # threefry's unrolled hashing dominates compile time of these small nets on CPU.
  return jax.random.key(seed, impl="unsafe_rbg")


def _jiggle(params, seed=1, scale=0.1):
  """Params with every leaf moved off its init, so zero-init branches stop hiding inputs."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + scale * rng.standard_normal(p.shape, dtype=np.float32), params)


@pytest.fixture(scope="module")
def unet():
  model = UNet(**TINY_UNET)
  x, t, source = _inputs()
  params = jax.jit(model.init, static_argnames="train")(
      _key(0), x, t, source, train=False)["params"]
  apply = jax.jit(lambda p, x, t, source: model.apply({"params": p}, x, t, source, train=False))
  return model, params, apply


def test_unet_shape_and_zero_output_at_init(unet):
  _, params, apply = unet
  x, t, source = _inputs()
  out = apply(params, x, t, source)
  assert out.shape == (BATCH, SIZE, SIZE, 1) and out.dtype == jnp.float32
  # the last conv is zero-initialised, so the output is exactly zero whatever the input.
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_unet_sgd_step_moves_output_off_zero(unet):
  _, params, apply = unet
  x, t, source = _inputs()
  target = source[..., :1]
  loss = lambda p: jnp.mean((apply(p, x, t, source) - target) ** 2)
  optimizer = optax.sgd(0.1)
  loss_before, grads = jax.jit(jax.value_and_grad(loss))(params)
  updates, _ = optimizer.update(grads, optimizer.init(params))
  stepped = optax.apply_updates(params, updates)
  out = apply(stepped, x, t, source)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-4
  assert jnp.mean((out - target) ** 2) < loss_before


def test_unet_depends_on_t_source_and_state(unet):
  _, params, apply = unet
  params = _jiggle(params)
  x, t, source = _inputs()
  base = apply(params, x, t, source)
  assert np.abs(apply(params, x, t + 0.3, source) - base).max() > 1e-4
  assert np.abs(apply(params, x, t, source + 0.5) - base).max() > 1e-4
  assert np.abs(apply(params, x + 0.5, t, source) - base).max() > 1e-4
  # samples in a batch stay independent: changing sample 0 leaves sample 1 alone.
  moved = apply(params, x, t.at[0].add(0.3), source)
  np.testing.assert_allclose(moved[1], base[1], atol=1e-5)


def test_unet_regression_mode_without_state_or_time():
  model = UNet(**TINY_UNET)
  _, _, source = _inputs()
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), None, None, source, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, None, None, source, train=False), variables)
  assert out.shape == (BATCH, SIZE, SIZE, 1)
  # the first conv sees the source channels only.
  assert variables["params"]["Conv_0"]["kernel"].shape[2] == source.shape[-1]


def test_unet_dropout_uses_rng_in_training_only(unet):
  model = UNet(**{**TINY_UNET, "dropout": 0.5})
  _, params, _ = unet  # dropout adds no parameters
  params = _jiggle(params)
  x, t, source = _inputs()

  @functools.partial(jax.jit, static_argnames="train")
  def run(seed, train):
    return model.apply({"params": params}, x, t, source, train=train,
                       rngs={"dropout": _key(seed)})

  assert np.abs(run(0, train=True) - run(1, train=True)).max() > 1e-4
  np.testing.assert_array_equal(run(0, train=False), run(1, train=False))


def test_unet_rejects_indivisible_size():
  model = UNet(**{**TINY_UNET, "channel_mult": (1, 2, 2)})  # needs H, W divisible by 4
  x, t, source = _inputs(size=18)
  with pytest.raises(ValueError, match="divisible by 4"):
    model.init(jax.random.key(0), x, t, source, train=False)


def test_resnet_generator_shape_and_tanh_range():
  model = ResNetGenerator(out_channels=1, channels=8, num_blocks=2)
  _, _, source = _inputs()
  # inputs far outside [-1, 1] would drive a missing tanh well past the bound.
  params = _jiggle(jax.jit(model.init, static_argnames="train")(_key(0), source, train=False))
  out = jax.jit(lambda p: model.apply(p, 50.0 * source, train=False))(params)
  assert out.shape == (BATCH, SIZE, SIZE, 1)
  assert np.all(np.abs(out) <= 1.0) and np.abs(out).max() > 0.5


def test_resnet_generator_rejects_indivisible_size():
  _, _, source = _inputs(size=18)
  with pytest.raises(ValueError, match="divisible by 4"):
    ResNetGenerator(out_channels=1, channels=8, num_blocks=1).init(
        jax.random.key(0), source, train=False)


def test_patchgan_output_shape():
  # pix2pix's 256x256 input gives a 30x30 logit map.
  image = jnp.zeros((1, 256, 256, 2))
  model = PatchGAN()
  out = jax.eval_shape(
      lambda: model.apply(model.init(jax.random.key(0), image, train=False), image, train=False))
  assert out.shape == (1, 30, 30, 1)


@pytest.mark.parametrize("num_layers, published", [(1, 16), (2, 34), (3, 70)])
def test_patchgan_receptive_field_formula(num_layers, published):
  # the 16x16, 34x34 and 70x70 PatchGANs of Isola et al. 2017.
  assert receptive_field(num_layers) == published


def test_patchgan_logits_see_exactly_their_70x70_patch():
  # without instance norm, whose statistics span the whole image, a logit depends on its
  # patch alone: an input pixel must move exactly the logits whose patch contains it.
  size, pixel = 128, (61, 40)
  model = PatchGAN(channels=4, num_layers=3, norm="none")
  image = jax.random.normal(jax.random.key(0), (1, size, size, 1))
  params = jax.jit(model.init, static_argnames="train")(_key(1), image, train=False)
  logits = jax.jit(lambda im: model.apply(params, im, train=False)[0, :, :, 0])
  changed = np.abs(logits(image.at[0, pixel[0], pixel[1], 0].add(10.0)) - logits(image)) > 0

  # five 4x4 convs, padding 1, strides 2,2,2,1,1: logit i covers input rows
  # [jump*i - offset, jump*i - offset + field - 1].
  field, jump, offset = 70, 8, 1 * (1 + 2 + 4 + 8 + 8)
  rows = np.arange(changed.shape[0])
  covers = lambda p: (jump * rows - offset <= p) & (p <= jump * rows - offset + field - 1)
  expected = covers(pixel[0])[:, None] & covers(pixel[1])[None, :]
  assert changed.shape == (14, 14) and 0 < expected.sum() < expected.size
  np.testing.assert_array_equal(changed, expected)


def test_registry_builds_every_model():
  assert set(MODELS) == {"unet", "resnet", "patchgan", "uvit", "mamba",
                         "autoencoder", "ar_transformer"}
  assert isinstance(build("unet", **TINY_UNET), UNet)
  assert isinstance(build("resnet", out_channels=1), ResNetGenerator)
  assert isinstance(build("patchgan", num_layers=2), PatchGAN)


def test_registry_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="patchgan, resnet, unet"):
    build("vit")


def test_registry_unknown_argument_is_named():
  with pytest.raises(ValueError, match="chanels"):
    build("unet", out_channels=1, chanels=32)
  with pytest.raises(ValueError, match="out_channels"):
    build("resnet")


# -- volumes (model.dims=3) ---------------------------------------------------------

TINY_3D = dict(TINY_UNET, dims=3)
VOLUME = (BATCH, 8, 16, 16)  # (B, D, H, W): D the axial slice axis


def test_3d_backbones_keep_the_volume_shape():
  source = jax.ShapeDtypeStruct((*VOLUME, 2), jnp.float32)
  x = jax.ShapeDtypeStruct((*VOLUME, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((BATCH,), jnp.float32)
  unet = build("unet", **TINY_3D)
  out = jax.eval_shape(lambda x, t, s: unet.apply(unet.init(_key(0), x, t, s, train=False),
                                                  x, t, s, train=False), x, t, source)
  assert out.shape == (*VOLUME, 1)
  resnet = build("resnet", out_channels=3, channels=4, num_blocks=1, dims=3)
  out = jax.eval_shape(lambda s: resnet.apply(resnet.init(_key(0), s, train=False), s,
                                              train=False), source)
  assert out.shape == (*VOLUME, 3)
  # each 4-wide conv with padding 1 maps a side n to (n - 2) // stride + 1.
  image = jax.ShapeDtypeStruct((1, 16, 32, 24, 2), jnp.float32)
  patchgan = build("patchgan", channels=4, num_layers=2, dims=3)
  out = jax.eval_shape(lambda im: patchgan.apply(patchgan.init(_key(0), im, train=False), im,
                                                 train=False), image)
  side = lambda n: (((n // 2) // 2) - 1) - 1  # strides 2, 2, then two stride-1 convs
  assert out.shape == (1, side(16), side(32), side(24), 1) == (1, 2, 6, 4, 1)


def _group_norm(x, groups, scale, bias, eps=1e-5):
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _conv3d(x, kernel, bias, stride=1, padding=1):
  out = jax.lax.conv_general_dilated(
      x, kernel, (stride,) * 3, [(padding, padding)] * 3,
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision="highest")
  return np.asarray(out) + bias


def test_3d_blocks_match_lax_convolutions():
  # ResBlock (norm, FiLM over every voxel, 3³ convs, 1³ skip), Downsample (stride 2 in
  # D, H and W) and Upsample (nearest along all three axes) against lax and numpy.
  from medjax.models.layers import Downsample, ResBlock, Upsample
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 6, 8, 4)).astype(np.float32)
  emb = rng.standard_normal((2, 16)).astype(np.float32)
  block = ResBlock(8, num_groups=2)
  params = _jiggle(block.init(_key(0), x, emb, False)["params"], scale=0.3)
  out = jax.jit(lambda p: block.apply({"params": p}, x, emb, False))(params)
  silu = lambda v: v / (1 + np.exp(-v))
  p = jax.tree.map(np.asarray, params)
  h = silu(_group_norm(x, 2, p["GroupNorm_0"]["scale"], p["GroupNorm_0"]["bias"]))
  h = _conv3d(h, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
  film = silu(emb) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  scale, shift = film[:, None, None, None, :8], film[:, None, None, None, 8:]
  h = _group_norm(h, 2, p["GroupNorm_1"]["scale"], p["GroupNorm_1"]["bias"]) * (1 + scale) + shift
  h = _conv3d(silu(h), p["Conv_1"]["kernel"], p["Conv_1"]["bias"])
  skip = x @ p["skip"]["kernel"].reshape(4, 8) + p["skip"]["bias"]
  np.testing.assert_allclose(out, skip + h, atol=2e-4)

  down = Downsample(8)
  dp = down.init(_key(1), x)["params"]
  np.testing.assert_allclose(down.apply({"params": dp}, x),
                             _conv3d(x, dp["Conv_0"]["kernel"], dp["Conv_0"]["bias"], stride=2),
                             atol=1e-4)
  assert down.apply({"params": dp}, x).shape == (2, 2, 3, 4, 8)
  up = Upsample(8)
  upp = up.init(_key(2), x)["params"]
  nearest = x.repeat(2, axis=1).repeat(2, axis=2).repeat(2, axis=3)
  np.testing.assert_allclose(up.apply({"params": upp}, x),
                             _conv3d(nearest, upp["Conv_0"]["kernel"], upp["Conv_0"]["bias"]),
                             atol=1e-4)


def test_3d_unet_on_one_slice_is_the_2d_unet_with_the_middle_kernel_slice():
  # With depth 1 and zero padding, a 3×3×3 kernel sees the slice through its middle plane
  # only; norms and attention see the same H·W positions. So a one-level 3D U-Net on
  # (B, 1, H, W, C) is the 2D U-Net whose kernels are the 3D ones' middle planes.
  kw = dict(TINY_UNET, channel_mult=(1,), attention_levels=(0,))
  x, t, source = _inputs()
  net3, net2 = UNet(**kw, dims=3), UNet(**kw)
  params3 = _jiggle(jax.jit(net3.init, static_argnames="train")(
      _key(0), x[:, None], t, source[:, None], train=False)["params"])
  params2 = jax.tree_util.tree_map_with_path(
      lambda path, p: p[1] if path[-1].key == "kernel" and p.ndim == 5 else p, params3)
  out3 = jax.jit(lambda p: net3.apply({"params": p}, x[:, None], t, source[:, None],
                                      train=False))(params3)
  out2 = jax.jit(lambda p: net2.apply({"params": p}, x, t, source, train=False))(params2)
  assert out3.shape == (BATCH, 1, SIZE, SIZE, 1)
  assert np.abs(out2).max() > 1e-2
  np.testing.assert_allclose(out3[:, 0], out2, atol=1e-4)


def test_input_rank_must_match_dims():
  x, t, source = _inputs()
  with pytest.raises(ValueError, match=r"model.dims=3 expects \(B, D, H, W, C\) inputs, "
                                       r"got shape \(2, 16, 16, 2\)"):
    jax.eval_shape(lambda: UNet(**TINY_3D).init(jax.random.key(0), None, None, source,
                                                 train=False))
  with pytest.raises(ValueError, match=r"model.dims=2 expects \(B, H, W, C\)"):
    jax.eval_shape(lambda: ResNetGenerator(1, channels=4, num_blocks=1).init(
        jax.random.key(0), source[:, None], train=False))
  with pytest.raises(ValueError, match=r"model.dims=3 expects"):
    jax.eval_shape(lambda: PatchGAN(dims=3).init(jax.random.key(0), source, train=False))
  # a PatchGAN too deep for its input says so (it gave an empty logit map and NaN losses).
  with pytest.raises(ValueError, match="num_layers=3 leaves no logit along a side of 8"):
    jax.eval_shape(lambda: PatchGAN(dims=3).init(jax.random.key(0), jnp.zeros((1, 8, 32, 32, 2)),
                                                 train=False))
  # every spatial axis is named where it must divide.
  with pytest.raises(ValueError, match="D, H and W divisible by 2, got 9x16x16"):
    jax.eval_shape(lambda: UNet(**TINY_3D).init(jax.random.key(0), None, None,
                                                 jnp.zeros((1, 9, 16, 16, 2)), train=False))


def _unet_parameter_count(cin, out, channels, mult, blocks, decoder_blocks, kernel=27):
  """Parameters of the ADM U-Net without attention, counted layer by layer."""
  emb = 4 * channels
  conv = lambda i, o, k=kernel: k * i * o + o

  def res(i, o):  # norm, conv, FiLM dense, norm, conv, 1³ skip when widths differ
    return 2 * i + conv(i, o) + (emb * 2 * o + 2 * o) + 2 * o + conv(o, o) + (
        conv(i, o, 1) if i != o else 0)

  total = (channels * emb + emb) + (emb * emb + emb) + conv(cin, channels)
  h, skips = channels, [channels]
  for level, m in enumerate(mult):
    for _ in range(blocks):
      total, h = total + res(h, channels * m), channels * m
      skips.append(h)
    if decoder_blocks is not None:
      skips[-(blocks + 1):] = [h]
    if level < len(mult) - 1:
      total += conv(h, h)
      skips.append(h)
  total += 2 * res(h, h)
  for level, m in reversed(list(enumerate(mult))):
    for block in range(blocks + 1 if decoder_blocks is None else decoder_blocks):
      skip = skips.pop() if decoder_blocks is None or block == 0 else 0
      total, h = total + res(h + skip, channels * m), channels * m
    if level:
      total += conv(h, h)
  return total + 2 * h + conv(h, out)


@pytest.mark.parametrize("decoder_blocks", [None, 1, 3])
def test_decoder_blocks_parameter_count(decoder_blocks):
  kw = dict(out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=2,
            attention_levels=(), dims=3)
  model = build("unet", **kw, decoder_blocks=decoder_blocks)
  source = jax.ShapeDtypeStruct((1, 8, 8, 8, 2), jnp.float32)
  params = jax.eval_shape(lambda s: model.init(_key(0), None, None, s, train=False), source)
  count = sum(p.size for p in jax.tree.leaves(params))
  assert count == _unet_parameter_count(2, 1, 8, (1, 2), 2, decoder_blocks)
  if decoder_blocks == 1:  # shallower than ADM's 3 blocks per decoder level
    assert count < _unet_parameter_count(2, 1, 8, (1, 2), 2, None)
