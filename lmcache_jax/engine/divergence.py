"""What errors in the cache cost the model's next-token predictions.

``log_probs`` runs the model over one sequence while its cache holds every
key (after RoPE) and value with a given error, read as a quantized cache
reads it: each query reads its latest ``residual`` tokens and the first
``sinks`` exact and older tokens with their errors. ``head_divergence``
measures, for every (layer, kv head) and every candidate error of it, the
KL divergence of the model's predictions on the text from the exact ones
when that head alone carries the error: what storing the head that way
costs, in the units perplexity is made of (nats per text).

The forward pass is the model's own: its embedding, layers (``Block``) and
output head, with one change: each layer's queries read their keys and
values through ``read_with_errors`` (the attention op's contract, float32
causal attention over the sequence itself) instead of a cache. Layers before
the measured one are run once; each measurement runs the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmcache_jax import attention, progress
from lmcache_jax.arch.rope import inverse_frequencies
from lmcache_jax.cache.step import Step
from lmcache_jax.kernels.masking import MASKED
from lmcache_jax.models.loaded import LoadedModel

_HI = jax.lax.Precision.HIGHEST


def _attend(q, k, v, errors=None, *, residual: int = 0, sinks: int = 0):
  """Causal attention of q [T, N, Hd] over keys and values [T, K, Hd]:
  tokens within ``residual`` of a query, and the first ``sinks``, read
  exact, older ones with ``errors`` (key, value) [T, K, Hd] added (None:
  every read exact). Returns [T, N·Hd]."""
  steps, num_heads, head_dim = q.shape
  num_kv = k.shape[1]
  qg = q.reshape(steps, num_kv, num_heads // num_kv, head_dim)
  t = jnp.arange(steps)
  dist = t[:, None] - t[None, :]
  far = ~((dist < residual) | (t[None, :] < sinks))[None, None]
  logits = jnp.einsum("TKGH,SKH->KGTS", qg, k, precision=_HI)
  if errors is not None:
    logits = logits + jnp.where(far, jnp.einsum(
        "TKGH,SKH->KGTS", qg, errors[0], precision=_HI), 0.0)
  p = jax.nn.softmax(jnp.where((dist >= 0)[None, None],
                               logits * head_dim ** -0.5, MASKED), axis=-1)
  out = jnp.einsum("KGTS,SKH->TKGH", p, v, precision=_HI)
  if errors is not None:
    out = out + jnp.einsum("KGTS,SKH->TKGH", jnp.where(far, p, 0.0),
                           errors[1], precision=_HI)
  return out.reshape(steps, num_heads * head_dim)


def read_with_errors(errors=None, *, residual: int = 0, sinks: int = 0):
  """An ``attend`` for the model's ``Block`` (``attention.attend``'s
  contract) that reads no cache: ``_attend`` over the step's own keys and
  values, one sequence, with ``errors`` (key, value) [T, K, Hd] on the far
  reads (None: every read exact). The cache passes through untouched."""

  def attend(q, k, v, kv, layer, step, request):
    del layer, step, request   # one sequence at positions 0..T-1
    out = _attend(q[0], k[0], v[0], errors, residual=residual, sinks=sinks)
    return out.reshape(q.shape), kv, None

  return attend


def _block(model, blocks, x, layer, errors=None, *, residual: int = 0,
           sinks: int = 0):
  """The model's block ``layer`` over x [1, T, D], its queries reading the
  keys and values with ``errors`` (``read_with_errors``)."""
  block = nnx.merge(*blocks)
  positions = jnp.arange(x.shape[1])[None]
  step = Step(positions=positions, rope_positions=positions, slots=None,
              query_weights=None)
  x, _, _ = block(x, None, layer, step, inverse_frequencies(model.cfg),
                  attention.Request(), attend=read_with_errors(
                      errors, residual=residual, sinks=sinks))
  return x


def _head(model, x):
  """Next-token log-probabilities [T - 1, V] from the last hidden states."""
  return jax.nn.log_softmax(model.logits(x[0, :-1]), axis=-1)


def log_probs(model, tokens, key_error, value_error, *, residual: int,
              sinks: int):
  """Next-token log-probabilities [T - 1, V] float32 of ``tokens`` [T] when
  the cache holds its keys and values with errors ``key_error`` /
  ``value_error`` [L, T, K, Hd] (module docstring)."""
  blocks = nnx.split(model.blocks)

  def body(x, per_layer):
    layer, dk, dv = per_layer
    return _block(model, blocks, x, layer, (dk, dv), residual=residual,
                  sinks=sinks), None

  x = model.embed_tokens(tokens[None])
  x, _ = jax.lax.scan(body, x, (jnp.arange(model.cfg.num_layers), key_error,
                                value_error))
  return _head(model, x)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _inputs(graphdef, params, tokens):
  """The exact hidden states entering every layer [L, 1, T, D] and the
  exact log-probabilities."""
  model = nnx.merge(graphdef, params)
  blocks = nnx.split(model.blocks)

  def body(x, layer):
    return _block(model, blocks, x, layer), x

  x = model.embed_tokens(tokens[None])
  x, inputs = jax.lax.scan(body, x, jnp.arange(model.cfg.num_layers))
  return inputs, _head(model, x)


@functools.partial(jax.jit, static_argnames=("graphdef", "residual", "sinks",
                                             "batch"))
def _layer_divergence(graphdef, params, x, exact, layer, key_errors,
                      value_errors, *, residual: int, sinks: int, batch: int):
  """KL [N] of the predictions from ``exact`` for each of N errors
  [N, T, K, Hd] of layer ``layer``'s cache, x [1, T, D] its input."""
  model = nnx.merge(graphdef, params)
  blocks = nnx.split(model.blocks)

  def one(errors):
    y = _block(model, blocks, x, layer, errors, residual=residual,
               sinks=sinks)
    y = jax.lax.fori_loop(layer + 1, model.cfg.num_layers,
                          lambda l, h: _block(model, blocks, h, l), y)
    return jnp.sum(jnp.exp(exact) * (exact - _head(model, y)))

  return jax.lax.map(one, (key_errors, value_errors), batch_size=batch)


def head_divergence(lm: LoadedModel, tokens, key_errors: np.ndarray,
                    value_errors: np.ndarray, *, residual: int = 0,
                    sinks: int = 0) -> np.ndarray:
  """KL divergence [L, K, W] (nats summed over the text's predictions) of
  the model's next-token distributions on ``tokens`` (one sequence) from
  its exact ones when head k of layer l alone holds its keys and values
  with errors ``key_errors``/``value_errors`` [W, L, K, T, Hd] (after RoPE,
  aligned with ``calibration.collect``'s keys_rope and values), for each
  of W candidates (bit widths, say). Queries read their latest
  ``residual`` tokens and the first ``sinks`` exact."""
  tokens = np.asarray(tokens, np.int32)
  widths, num_layers, num_kv, steps, head_dim = key_errors.shape
  if len(tokens) < 2 or steps != len(tokens):
    raise ValueError(f"head_divergence needs errors for each of at least 2 "
                     f"tokens; got {len(tokens)} tokens, errors for {steps}")
  out = np.zeros((num_layers, num_kv, widths))
  if len(tokens) - 2 - residual < sinks:
    return out   # no scored query (the last predicts nothing) reads far
  params = jax.tree.map(lambda a: a.astype(jnp.float32), lm.params)
  inputs, exact = _inputs(lm.graphdef, params, jnp.asarray(tokens))
  # one error per (head, width): that head's, every other head exact
  alone = np.eye(num_kv, dtype=bool)[:, None, :, None, None]   # [K, 1, K, 1, 1]
  for l in progress.bar(range(num_layers), desc="head divergence",
                        unit="layer"):
    def per_head(errors):   # [W, K, T, Hd] -> [K·W, T, K, Hd]
      e = np.where(alone, errors[None, :, :], 0.0)       # [K, W, K, T, Hd]
      return jnp.asarray(e.reshape(num_kv * widths, num_kv, steps,
                                   head_dim).transpose(0, 2, 1, 3),
                         jnp.float32)
    kl = _layer_divergence(lm.graphdef, params, inputs[l], exact,
                           jnp.int32(l), per_head(key_errors[:, l]),
                           per_head(value_errors[:, l]), residual=residual,
                           sinks=sinks, batch=num_kv)
    out[l] = np.asarray(kl).reshape(num_kv, widths)
  return out
