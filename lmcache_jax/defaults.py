"""The defaults the Python API and the command line share, each in one place.

``configs/default.py`` (the command line's config), ``experiments/setup.py``
(for a config that leaves a field out) and ``lmcache_jax.api`` read them,
so ``--kv_bits=4`` and ``generate(..., kv_bits=4)`` build the same plan.
"""

from __future__ import annotations

# -- What kv_bits alone builds: a uniform plan (docs/quantization.md) --------

# Channels sharing a scale and zero (a head dimension it does not divide
# needs an explicit group size).
GROUP_SIZE = 64
# Each query reads the first SINKS tokens and its RESIDUAL newest exact, as
# copies of COPY_BITS (8 = int8 codes, 16 = the cache's dtype); with them a
# uniform 4-bit plan stays within 1% of bf16 perplexity.
RESIDUAL = 32
SINKS = 4
COPY_BITS = 8
ROTATE = True          # Hadamard-rotate head vectors before quantizing
CENTER_KEYS = True     # subtract each key channel's mean on calibration text
CALIBRATION_TEXT = "macbeth"   # the Shakespeare work those means come from
CALIBRATION_TOKENS = 512       # its first tokens

# -- Eviction -----------------------------------------------------------------

# The budget of a policy that takes one when none is given: tokens, at most
# the prompt (command line only: a policy object always carries its budget).
BUDGET = 256

# -- Tokens per forward pass, and per stored chunk -------------------------

PREFILL_CHUNK = 512    # a prompt's tokens per pass while generating
SCORE_CHUNK = 256      # a text's tokens per pass while scoring perplexity
# An evicting policy streams at most this many tokens per pass (and at most
# its budget): the working room its cache holds beside the budget.
WORKING_CHUNK = 64
STORE_CHUNK = 256      # tokens per prefix-store chunk (LMCache's size)


def working_chunk(policy, chunk: int) -> int:
  """Tokens per forward pass when ``policy`` streams a text: ``chunk`` under
  a policy without a budget (``full``); under an evicting one at most
  ``WORKING_CHUNK`` and at most its budget, the working room its cache holds
  beside the budget."""
  budget = getattr(policy, "budget", None)
  return chunk if budget is None else max(1, min(chunk, WORKING_CHUNK, budget))
