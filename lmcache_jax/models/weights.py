"""The canonical weight layout every loader produces and the model consumes.

A checkpoint is a flat ``dict[str, np.ndarray]``. Matrices are stored as
``[in, out]`` (so ``x @ w``); per-layer tensors are stacked on a leading layer
axis ``L``. Q and K columns follow the Hugging Face "rotate half" RoPE
convention: within each head, feature ``i`` pairs with ``i + head_dim // 2``.

  name               shape                      note
  embed              [V, D]
  lm_head            [D, V]                     absent when embeddings are tied
  final_norm         [D]
  layers.attn_norm   [L, D]
  layers.q           [L, D, N*Hd]
  layers.k           [L, D, K*Hd]
  layers.v           [L, D, K*Hd]
  layers.q_bias      [L, N*Hd]                  only with qkv_bias (Qwen2)
  layers.k_bias      [L, K*Hd]                  only with qkv_bias
  layers.v_bias      [L, K*Hd]                  only with qkv_bias
  layers.o           [L, N*Hd, D]
  layers.mlp_norm    [L, D]
  layers.gate        [L, D, F]
  layers.up          [L, D, F]
  layers.down        [L, F, D]

V vocabulary, D hidden size, L layers, N query heads, K kv heads, Hd head dim,
F MLP width.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from lmcache_jax.arch.config import ModelConfig

_log = logging.getLogger(__name__)


def context_within_window(positions: int, window, where: str) -> int:
  """The longest context a model runs correctly here: its ``positions``, or
  its sliding attention ``window`` if shorter.

  Sliding-window attention is not implemented; every layer attends to the
  whole context, which is the model's own attention up to the window. So the
  window becomes ``ModelConfig.max_context``, and longer contexts are refused
  where a context is requested (with the full cache).
  """
  if window is None:
    return positions
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"{where}: sliding_window must be a positive int, got "
                     f"{window!r}")
  if window >= positions:
    return positions
  _log.warning("%s: sliding_window=%d is not supported, so max_context is "
               "the window, not %d: longer contexts are refused", where,
               window, positions)
  return window


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The name -> shape table above, for one config."""
  L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  q_dim = cfg.num_heads * cfg.head_dim
  kv_dim = cfg.num_kv_heads * cfg.head_dim
  shapes = {
      "embed": (cfg.vocab_size, D),
      "final_norm": (D,),
      "layers.attn_norm": (L, D),
      "layers.q": (L, D, q_dim),
      "layers.k": (L, D, kv_dim),
      "layers.v": (L, D, kv_dim),
      "layers.o": (L, q_dim, D),
      "layers.mlp_norm": (L, D),
      "layers.gate": (L, D, F),
      "layers.up": (L, D, F),
      "layers.down": (L, F, D),
  }
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (D, cfg.vocab_size)
  if cfg.qkv_bias:
    shapes["layers.q_bias"] = (L, q_dim)
    shapes["layers.k_bias"] = (L, kv_dim)
    shapes["layers.v_bias"] = (L, kv_dim)
  return shapes


def check_weights(cfg: ModelConfig, weights: dict, source: str) -> None:
  """Raises ValueError naming every missing, unexpected or misshapen tensor.

  Host (NumPy) tensors are also checked for NaN/inf; device arrays are not
  pulled back for that.
  """
  want = expected_shapes(cfg)
  problems = []
  for name in sorted(set(want) - set(weights)):
    problems.append(f"missing {name} {want[name]}")
  for name in sorted(set(weights) - set(want)):
    problems.append(f"unexpected {name} {tuple(weights[name].shape)}")
  for name in sorted(set(want) & set(weights)):
    got = tuple(weights[name].shape)
    if got != want[name]:
      problems.append(f"{name} has shape {got}, expected {want[name]}")
  for name, array in weights.items():
    if name in want and isinstance(array, np.ndarray) and not np.all(
        np.isfinite(array)):
      problems.append(f"{name} holds non-finite values")
  if problems:
    raise ValueError(f"weights from {source} do not fit model {cfg.name!r}: "
                     + "; ".join(problems))


def gather_weights(cfg: ModelConfig, dtype,
                   read: Callable[[str, str | None, tuple[int, ...]], np.ndarray]
                   ) -> dict[str, np.ndarray]:
  """Canonical weights from a per-tensor reader.

  ``read(name, layer, shape)`` returns one tensor in canonical orientation:
  a global one (``layer`` None) or layer ``layer``'s slice of a ``layers.*``
  tensor, which is stacked here.
  """
  weights = {}
  for name, shape in expected_shapes(cfg).items():
    if not name.startswith("layers."):
      weights[name] = read(name, None, shape).astype(dtype)
      continue
    stacked = np.empty(shape, dtype)
    for i in range(cfg.num_layers):
      stacked[i] = read(name, i, shape[1:])
    weights[name] = stacked
  return weights
