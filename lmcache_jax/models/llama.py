"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax NNX.

``Transformer`` = embedding → ``Block`` × L → final norm → output head, and a
``Block`` = RMSNorm → ``Attention`` → RMSNorm → ``MLP``, with residuals.
Per-layer parameters are stacked on a leading layer axis and one ``Block``
runs under ``lax.scan``, so compile time stays flat in depth. The KV cache
is not part of the module: an explicit pytree passed in and returned, which
attention reaches only through the attention op.

This is the only copy of the architecture: calibration runs a ``Block``
with ``trace=True`` to get what each layer projected, and the divergence
measurement runs it with its own ``attend`` (the attention op's contract)
to read keys and values with errors. Both are static, so the model's own
passes compile as before.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Projections(NamedTuple):
  """What a layer's attention projected from its input x [B, T, D]: rotated
  queries [B, T, N, Hd], keys before and after RoPE and values [B, T, K, Hd]
  (the keys after RoPE and the values are what the cache is given)."""
  queries: jax.Array
  keys: jax.Array
  keys_rope: jax.Array
  values: jax.Array


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
              inv_freq: np.ndarray) -> Projections:
    """The layer's ``Projections`` of its normed input h [B, T, D]."""
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
    return Projections(apply_rope(q, rope_positions, inv_freq), k,
                       apply_rope(k, rope_positions, inv_freq), v)

  def __call__(self, h: jax.Array, kv: attention.LayerKV, layer: jax.Array,
               step: Step, inv_freq: np.ndarray, request: attention.Request,
               attend=attention.attend):
    """Attention block output [B, T, D], the stacked cache with this step's
    keys and values in layer ``layer``, the slot mass (or None) and the
    ``Projections``. ``attend`` reads the cache (``attention.attend``'s
    contract)."""
    proj = self.project(h, layer, step.rope_positions, inv_freq)
    out, kv, mass = attend(proj.queries, proj.keys_rope, proj.values, kv,
                           layer, step, request)
    out = layer_matmul(out.reshape(*h.shape[:2], -1), self.o, layer)
    return out, kv, mass, proj


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
               step: Step, inv_freq: np.ndarray, request: attention.Request,
               *, attend=attention.attend, trace: bool = False):
    """Layer ``layer`` over x [B, T, D]: (x, the stacked cache, slot mass),
    and with ``trace`` the layer's ``Projections`` after them.

    ``attend`` is how the layer's queries read the cache, with
    ``attention.attend``'s contract; measurements swap it (jit specializes
    on it and on ``trace``, so the model's own passes are unchanged)."""
    eps = self.cfg.norm_eps
    out, kv, mass, proj = self.attn(
        rms_norm(x, at_layer(self.attn_norm, layer), eps), kv, layer, step,
        inv_freq, request, attend)
    x = x + out
    x = x + self.mlp(rms_norm(x, at_layer(self.mlp_norm, layer), eps), layer)
    return (x, kv, mass, proj) if trace else (x, kv, mass)


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
    x = self.embed_tokens(tokens)
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
    return self.logits(x), cache, mass

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The hidden states [..., D] that token ids [...] enter the first
    layer with."""
    return jnp.take(self.embed[...], tokens, axis=0)

  def logits(self, x: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of the last layer's hidden states x [..., D]
    (final norm, then the output projection)."""
    x = rms_norm(x, self.final_norm[...], self.cfg.norm_eps)
    head = (self.embed[...].T if self.cfg.tie_embeddings
            else self.lm_head[...])
    return jnp.matmul(x, head, precision=matmul_precision(x.dtype),
                      preferred_element_type=jnp.float32)


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
