"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax NNX.

``Transformer`` = embedding → ``Block`` × L → final norm → output head, and a
``Block`` = RMSNorm → ``Attention`` → RMSNorm → ``MLP``, with residuals.
Per-layer parameters are stacked on a leading layer axis and one ``Block``
runs under ``lax.scan``, so compile time stays flat in depth. The KV cache
is not part of the module: an explicit pytree passed in and returned, which
attention reaches only through the attention op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmcache_jax import attention
from lmcache_jax.attention import matmul_precision
from lmcache_jax.cache.kv_cache import KVCache
from lmcache_jax.cache.step import Step
from lmcache_jax.kernels import stacked_matmul
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.arch.rope import apply_rope, inverse_frequencies
from lmcache_jax.models.weights import check_weights, expected_shapes


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def at_layer(param: nnx.Param, layer: jax.Array) -> jax.Array:
  """Layer ``layer`` of a stacked parameter."""
  return jax.lax.dynamic_index_in_dim(param[...], layer, keepdims=False)


def layer_matmul(x: jax.Array, params, layer: jax.Array):
  """x [..., K] @ layer ``layer`` of a stacked [L, K, N] weight; given a tuple
  of such weights, the tuple of their products.

  A few rows of 16-bit data on a GPU (decode) go through
  ``kernels.stacked_matmul``, which reads the layer in place (XLA would copy
  it out of the stack first, and decode is bound by weight bytes) and takes
  weights sharing an input in one launch.
  """
  many = isinstance(params, tuple)
  ws = tuple(p[...] for p in (params if many else (params,)))
  rows = int(np.prod(x.shape[:-1]))
  if (rows <= stacked_matmul.MAX_ROWS and jax.default_backend() == "gpu"
      and x.dtype == ws[0].dtype and jnp.dtype(x.dtype).itemsize == 2):
    out = stacked_matmul.stacked_matmul(x.reshape(rows, -1), ws, layer)
    out = out.astype(x.dtype).reshape(*x.shape[:-1], -1)
    outs = jnp.split(out, np.cumsum([w.shape[-1] for w in ws[:-1]]), axis=-1)
  else:
    outs = [jnp.matmul(x, jax.lax.dynamic_index_in_dim(w, layer, keepdims=False),
                       precision=matmul_precision(x.dtype)) for w in ws]
  return tuple(outs) if many else outs[0]


class Attention(nnx.Module):
  """Grouped-query self-attention: the projections and RoPE. Attention over
  the cache itself is the attention op (``lmcache_jax.attention.attend``),
  which owns formats and kernels."""

  def __init__(self, cfg: ModelConfig, dtype):
    L, D = cfg.num_layers, cfg.hidden_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.q = nnx.Param(jnp.zeros((L, D, q_dim), dtype))
    self.k = nnx.Param(jnp.zeros((L, D, kv_dim), dtype))
    self.v = nnx.Param(jnp.zeros((L, D, kv_dim), dtype))
    self.o = nnx.Param(jnp.zeros((L, q_dim, D), dtype))
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((L, q_dim), dtype))
      self.k_bias = nnx.Param(jnp.zeros((L, kv_dim), dtype))
      self.v_bias = nnx.Param(jnp.zeros((L, kv_dim), dtype))
    self.cfg = cfg

  def project(self, h: jax.Array, layer: jax.Array, rope_positions: jax.Array,
              inv_freq: np.ndarray):
    """q (rotated) [B, T, N, Hd], k before and after RoPE and v [B, T, K, Hd]."""
    cfg = self.cfg
    batch, steps, _ = h.shape

    names = ("q", "k", "v")
    outs = layer_matmul(h, tuple(getattr(self, n) for n in names), layer)

    def heads_of(name, out, heads):
      bias = getattr(self, name + "_bias", None)
      out = out if bias is None else out + at_layer(bias, layer)
      return out.reshape(batch, steps, heads, cfg.head_dim)

    q, k, v = (heads_of(n, out, heads) for n, out, heads in zip(
        names, outs, (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)))
    q = apply_rope(q, rope_positions, inv_freq)
    return q, k, apply_rope(k, rope_positions, inv_freq), v

  def __call__(self, h: jax.Array, kv: attention.LayerKV, layer: jax.Array,
               step: Step, inv_freq: np.ndarray, request: attention.Request):
    """Attention block output [B, T, D], the stacked cache with this step's
    keys and values in layer ``layer``, and the slot mass (or None)."""
    q, _, k, v = self.project(h, layer, step.rope_positions, inv_freq)
    out, kv, mass = attention.attend(q, k, v, kv, layer, step, request)
    return layer_matmul(out.reshape(*h.shape[:2], -1), self.o, layer), kv, mass


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, dtype):
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    self.gate = nnx.Param(jnp.zeros((L, D, F), dtype))
    self.up = nnx.Param(jnp.zeros((L, D, F), dtype))
    self.down = nnx.Param(jnp.zeros((L, F, D), dtype))

  def __call__(self, h: jax.Array, layer: jax.Array) -> jax.Array:
    gate, up = layer_matmul(h, (self.gate, self.up), layer)
    gated = jax.nn.silu(gate) * up
    return layer_matmul(gated, self.down, layer)


class Block(nnx.Module):
  """One pre-norm decoder layer. Every parameter has a leading layer axis:
  the model scans one ``Block`` over the layer index, and each call reads
  its layer of the stacked parameters (and of the stacked cache)."""

  def __init__(self, cfg: ModelConfig, dtype):
    self.attn_norm = nnx.Param(jnp.zeros((cfg.num_layers, cfg.hidden_size), dtype))
    self.attn = Attention(cfg, dtype)
    self.mlp_norm = nnx.Param(jnp.zeros((cfg.num_layers, cfg.hidden_size), dtype))
    self.mlp = MLP(cfg, dtype)
    self.cfg = cfg

  def __call__(self, x: jax.Array, kv: attention.LayerKV, layer: jax.Array,
               step: Step, inv_freq: np.ndarray, request: attention.Request):
    """Layer ``layer`` over x [B, T, D]: (x, the stacked cache, slot mass)."""
    eps = self.cfg.norm_eps
    out, kv, mass = self.attn(rms_norm(x, at_layer(self.attn_norm, layer), eps),
                              kv, layer, step, inv_freq, request)
    x = x + out
    return x + self.mlp(rms_norm(x, at_layer(self.mlp_norm, layer), eps),
                        layer), kv, mass


# Owner of each per-layer canonical weight ("layers.<name>") inside a Block.
_BLOCK_PARAM = {"attn_norm": (), "mlp_norm": (),
                "q": ("attn",), "k": ("attn",), "v": ("attn",), "o": ("attn",),
                "q_bias": ("attn",), "k_bias": ("attn",), "v_bias": ("attn",),
                "gate": ("mlp",), "up": ("mlp",), "down": ("mlp",)}


class Transformer(nnx.Module):
  """Embedding, scanned decoder blocks, final norm and output projection."""

  def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16):
    shapes = expected_shapes(cfg)
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Param(jnp.zeros(shapes["embed"], dtype))
    self.final_norm = nnx.Param(jnp.zeros(shapes["final_norm"], dtype))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(jnp.zeros(shapes["lm_head"], dtype))
    self.blocks = Block(cfg, dtype)

  def __call__(self, tokens: jax.Array, cache: KVCache, step: Step,
               logits_for: str = "all",
               request: attention.Request = attention.Request()):
    """Runs ``tokens`` [B, T] through the model, writing their KV into ``cache``.

    Args:
      logits_for: "all" → logits [B, T, V]; "last" → [B, V] for each
        sequence's last non-padding token; "none" → no logits.
      request: what the attention op may assume and must report (see
        ``attention.Request``).

    Returns:
      (logits, cache with the new keys/values, attention mass [L, B, K, S]
      or None).
    """
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0)
    inv_freq = inverse_frequencies(cfg)
    graphdef, block_params = nnx.split(self.blocks)

    def body(carry, per_layer):
      # The whole cache rides in the carry: each layer writes its tokens in
      # place, and attention and the weights are read at the layer index.
      x, kv = carry
      layer_slots, layer = per_layer
      block = nnx.merge(graphdef, block_params)
      x, kv, mass = block(x, kv, layer, step._replace(slots=layer_slots),
                          inv_freq, request)
      return (x, kv), mass

    kv = attention.LayerKV(cache.keys, cache.values, cache.positions,
                           cache.scores)
    (x, kv), mass = jax.lax.scan(
        body, (x, kv), (step.slots, jnp.arange(cfg.num_layers)))
    valid = step.positions >= 0
    new_lengths = jnp.maximum(cache.lengths,
                              jnp.max(jnp.where(valid, step.positions + 1, 0),
                                      axis=1))
    cache = cache.replace(keys=kv.keys, values=kv.values,
                          positions=kv.positions, scores=kv.scores,
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
    logits = jnp.matmul(x, head, precision=matmul_precision(x.dtype),
                        preferred_element_type=jnp.float32)
    return logits, cache, mass


def from_weights(cfg: ModelConfig, weights: dict, dtype=jnp.bfloat16,
                 source: str = "weights") -> Transformer:
  """Builds the model from canonical weights (see ``models.weights``)."""
  check_weights(cfg, weights, source)
  model = nnx.eval_shape(lambda: Transformer(cfg, dtype))
  for name, array in weights.items():
    owner = model
    if name.startswith("layers."):
      name = name.removeprefix("layers.")
      owner = model.blocks
      for attr in _BLOCK_PARAM[name]:
        owner = getattr(owner, attr)
    getattr(owner, name).set_value(jnp.asarray(array, dtype))
  return model


def random_weights(cfg: ModelConfig, seed: int = 0,
                   dtype=jnp.bfloat16) -> dict[str, jax.Array]:
  """Canonical weights drawn on the device, for timing real shapes.

  Matrices ~ N(0, 0.02), norms at 1. Generated per tensor on the default
  device, a layer at a time for stacked tensors, so even 13B-parameter
  presets never pass through host memory and the float32 draws never hold
  more than one layer's matrix.
  """
  key = jax.random.key(seed)
  weights = {}
  for i, (name, shape) in enumerate(sorted(expected_shapes(cfg).items())):
    if name.endswith("norm"):
      weights[name] = jnp.ones(shape, dtype)
      continue
    draw = lambda k, s=shape[1:] if name.startswith("layers.") else shape: (  # noqa: E731
        0.02 * jax.random.normal(k, s)).astype(dtype)
    k = jax.random.fold_in(key, i)
    if name.startswith("layers."):
      weights[name] = jax.jit(lambda k, d=draw, n=shape[0]: jax.lax.map(
          d, jax.random.split(k, n)))(k)
    else:
      weights[name] = jax.jit(draw)(k)
  return weights
