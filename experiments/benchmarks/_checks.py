"""Kernel results against their references, within the kernel's stated
precision: one check for the kernel suite (on the card) and the kernel tests
(interpret mode)."""

from __future__ import annotations

import numpy as np

from lmcache_jax.kernels.decode_attention import LOGIT_OFFSET_PRECISION, MASKED


def logit_rounding(logits) -> np.ndarray:
  """How far each exact logit of ``logits`` [..., S] (-1e30 where masked)
  may come back from ``BlockLogits.dense``: its float16 offset's rounding,
  ``LOGIT_OFFSET_PRECISION`` of its distance below its block's max, which
  is at most its distance below the row's max; 0 where masked (exact)."""
  logits = np.asarray(logits)
  visible = logits > MASKED / 2
  top = np.max(np.where(visible, logits, -np.inf), -1, keepdims=True)
  return np.where(visible, LOGIT_OFFSET_PRECISION * (top - logits), 0.0)


def assert_matches_reference(got, want, *, rtol: float, atol: float,
                             what: str = "") -> None:
  """Raises AssertionError unless ``decode_attention``'s (out, lse,
  BlockLogits) ``got`` matches ``decode_attention_reference``'s (out, lse,
  logits) ``want``: out and lse within ``rtol``/``atol``; each visible logit
  within that plus its float16 offset's rounding (``logit_rounding``);
  masked logits exactly -1e30."""
  for name, g, w in zip(("out", "lse"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                               atol=atol, err_msg=f"{name} {what}")
  got_logits, want_logits = np.asarray(got[2].dense()), np.asarray(want[2])
  visible = want_logits > MASKED / 2
  np.testing.assert_array_equal(got_logits[~visible], want_logits[~visible],
                                err_msg=f"masked logits {what}")
  bound = logit_rounding(want_logits) + atol + rtol * np.abs(want_logits)
  excess = (np.abs(got_logits - want_logits) - bound)[visible]
  if excess.size and excess.max() > 0:
    raise AssertionError(
        f"logits off by {excess.max():.3g} beyond their bound {what}")
