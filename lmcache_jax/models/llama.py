"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax NNX.

Per-layer parameters are stacked on a leading layer axis and the layers run
under ``lax.scan``, so compile time stays flat in depth. The KV cache is not
part of the module: it is an explicit pytree passed in and returned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from lmcache_jax.models import attention
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.arch.rope import apply_rope, inverse_frequencies
from lmcache_jax.models.weights import check_weights, expected_shapes


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


class Layers(nnx.Module):
  """All decoder layers; every parameter has a leading layer axis."""

  def __init__(self, cfg: ModelConfig, dtype):
    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
      if name.startswith("layers."):
        setattr(self, name.removeprefix("layers."),
                nnx.Param(jnp.zeros(shape, dtype)))
    self.cfg = cfg

  def __call__(self, x: jax.Array, layer_kv: attention.LayerKV, step: Step,
               layer_slots: jax.Array, inv_freq: np.ndarray,
               with_mass: bool = True):
    """One layer (parameters already sliced by the scan)."""
    cfg = self.cfg
    batch, steps, _ = x.shape
    precision = attention.matmul_precision(x.dtype)

    def proj(h, name):
      out = jnp.matmul(h, getattr(self, name)[...], precision=precision)
      bias = getattr(self, name + "_bias", None)
      return out if bias is None else out + bias[...]

    h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
    q = proj(h, "q").reshape(batch, steps, cfg.num_heads, cfg.head_dim)
    k = proj(h, "k").reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
    v = proj(h, "v").reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, step.rope_positions, inv_freq)
    k = apply_rope(k, step.rope_positions, inv_freq)
    layer_kv = attention.write_slots(layer_kv, k, v, step.positions,
                                     layer_slots)
    attn, mass = attention.attend(q, layer_kv, step.positions,
                                  step.query_weights, with_mass)
    x = x + jnp.matmul(attn.reshape(batch, steps, -1), self.o[...],
                       precision=precision)
    h = rms_norm(x, self.mlp_norm[...], cfg.norm_eps)
    gated = jax.nn.silu(proj(h, "gate")) * proj(h, "up")
    x = x + jnp.matmul(gated, self.down[...], precision=precision)
    return x, layer_kv, mass


class Transformer(nnx.Module):
  """Embedding, scanned decoder layers, final norm and output projection."""

  def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16):
    shapes = expected_shapes(cfg)
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Param(jnp.zeros(shapes["embed"], dtype))
    self.final_norm = nnx.Param(jnp.zeros(shapes["final_norm"], dtype))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(jnp.zeros(shapes["lm_head"], dtype))
    self.layers = Layers(cfg, dtype)

  def __call__(self, tokens: jax.Array, cache: KVCache, step: Step,
               logits_for: str = "all", with_mass: bool = True):
    """Runs ``tokens`` [B, T] through the model, writing their KV into ``cache``.

    Args:
      logits_for: "all" → logits [B, T, V]; "last" → [B, V] for each
        sequence's last non-padding token; "none" → no logits.
      with_mass: also return the attention mass each slot received.

    Returns:
      (logits, cache with the new keys/values, attention mass [L, B, K, S]
      or None).
    """
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0)
    inv_freq = inverse_frequencies(cfg)
    graphdef, layer_params = nnx.split(self.layers)

    def body(carry, per_layer):
      # The whole cache rides in the carry and each layer's slice is updated
      # in place, so the forward pass holds one cache, not an input and an
      # output copy.
      x, stacked_kv = carry
      params, layer_slots, index = per_layer
      layer_kv = jax.tree.map(
          lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False),
          stacked_kv)
      layer = nnx.merge(graphdef, params)
      x, layer_kv, mass = layer(x, layer_kv, step, layer_slots, inv_freq,
                                with_mass)
      stacked_kv = jax.tree.map(
          lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, index, 0),
          stacked_kv, layer_kv)
      return (x, stacked_kv), mass

    stacked_kv = attention.LayerKV(cache.keys, cache.values, cache.positions,
                                   cache.scores)
    layer_index = jnp.arange(cfg.num_layers)
    (x, new_kv), mass = jax.lax.scan(
        body, (x, stacked_kv), (layer_params, step.slots, layer_index))
    valid = step.positions >= 0
    new_lengths = jnp.maximum(cache.lengths,
                              jnp.max(jnp.where(valid, step.positions + 1, 0),
                                      axis=1))
    cache = KVCache(keys=new_kv.keys, values=new_kv.values,
                    positions=new_kv.positions, scores=new_kv.scores,
                    lengths=new_lengths.astype(jnp.int32))
    if logits_for == "none":
      return None, cache, mass
    if logits_for == "last":
      last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif logits_for != "all":
      raise ValueError(f"logits_for must be 'all', 'last' or 'none', "
                       f"got {logits_for!r}")
    x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    head = (self.embed[...].T if cfg.tie_embeddings else self.lm_head[...])
    logits = jnp.matmul(x, head, precision=attention.matmul_precision(x.dtype),
                        preferred_element_type=jnp.float32)
    return logits, cache, mass


def from_weights(cfg: ModelConfig, weights: dict, dtype=jnp.bfloat16,
                 source: str = "weights") -> Transformer:
  """Builds the model from canonical weights (see ``models.weights``)."""
  check_weights(cfg, weights, source)
  model = nnx.eval_shape(lambda: Transformer(cfg, dtype))
  for name, array in weights.items():
    owner = model.layers if name.startswith("layers.") else model
    param = getattr(owner, name.removeprefix("layers."))
    param.set_value(jnp.asarray(array, dtype))
  return model


def random_weights(cfg: ModelConfig, seed: int = 0,
                   dtype=jnp.bfloat16) -> dict[str, jax.Array]:
  """Canonical weights drawn on the device, for timing real shapes.

  Matrices ~ N(0, 0.02), norms at 1. Generated per tensor on the default
  device, so even 13B-parameter presets never pass through host memory.
  """
  key = jax.random.key(seed)
  weights = {}
  for i, (name, shape) in enumerate(sorted(expected_shapes(cfg).items())):
    if name.endswith("norm"):
      weights[name] = jnp.ones(shape, dtype)
    else:
      draw = jax.jit(lambda k, s=shape: (0.02 * jax.random.normal(k, s)).astype(dtype))
      weights[name] = draw(jax.random.fold_in(key, i))
  return weights
