"""An independent float64 NumPy implementation of the Llama architecture.

Written from the architecture's definition, without sharing code with
``lmcache_jax.models``, so that agreement between the two means something.
"""

from __future__ import annotations

import numpy as np


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta, scaling, linear_factor):
  """x [T, H, Hd]; rotate-half convention."""
  hd = x.shape[-1]
  half = hd // 2
  inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  inv = inv / linear_factor
  if scaling is not None:
    factor, low, high, orig = scaling
    out = []
    for f in inv:
      wavelen = 2 * np.pi / f
      if wavelen < orig / high:
        out.append(f)
      elif wavelen > orig / low:
        out.append(f / factor)
      else:
        s = (orig / wavelen - low) / (high - low)
        out.append((1 - s) * f / factor + s * f)
    inv = np.array(out)
  ang = positions[:, None].astype(np.float64) * inv[None, :]  # [T, half]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def reference_logits(cfg, weights, tokens, key_delta=None, value_delta=None,
                     exact_within=0, sinks=0):
  """Logits [T, V] float64 of one sequence ``tokens`` [T].

  ``key_delta``/``value_delta`` [L, T, K, Hd] (optional) are added to the
  keys (after RoPE) and values a query reads of tokens at least
  ``exact_within`` before it, other than the first ``sinks``: a cache whose
  stored entries carry those errors."""
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  t = len(tokens)
  pos = np.arange(t)
  x = w["embed"][np.asarray(tokens)]
  nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  causal = np.tril(np.ones((t, t), bool))
  dist = pos[:, None] - pos[None, :]
  far = (dist >= exact_within) & (pos[None, :] >= sinks)
  for i in range(cfg.num_layers):
    h = _rms_norm(x, w["layers.attn_norm"][i], cfg.norm_eps)
    q = h @ w["layers.q"][i]
    k = h @ w["layers.k"][i]
    v = h @ w["layers.v"][i]
    if cfg.qkv_bias:
      q = q + w["layers.q_bias"][i]
      k = k + w["layers.k_bias"][i]
      v = v + w["layers.v_bias"][i]
    q = _rope(q.reshape(t, nh, hd), pos, cfg.rope_theta, cfg.rope_scaling,
              cfg.rope_linear_factor)
    k = _rope(k.reshape(t, nkv, hd), pos, cfg.rope_theta, cfg.rope_scaling,
              cfg.rope_linear_factor)
    v = v.reshape(t, nkv, hd)
    dk = 0.0 if key_delta is None else np.asarray(key_delta[i], np.float64)
    dv = 0.0 if value_delta is None else np.asarray(value_delta[i], np.float64)
    k_far, v_far = k + dk, v + dv
    heads = []
    for head in range(nh):
      kv = head // (nh // nkv)
      s = np.where(far, q[:, head] @ k_far[:, kv].T, q[:, head] @ k[:, kv].T)
      s = np.where(causal, s / np.sqrt(hd), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      heads.append(np.where(far, 0.0, p) @ v[:, kv]
                   + np.where(far, p, 0.0) @ v_far[:, kv])
    x = x + np.concatenate(heads, axis=-1) @ w["layers.o"][i]
    h = _rms_norm(x, w["layers.mlp_norm"][i], cfg.norm_eps)
    g = h @ w["layers.gate"][i]
    x = x + ((g / (1 + np.exp(-g))) * (h @ w["layers.up"][i])) @ w["layers.down"][i]
  x = _rms_norm(x, w["final_norm"], cfg.norm_eps)
  head = w["embed"].T if cfg.tie_embeddings else w["lm_head"]
  return x @ head
