"""KV-cache quantization: formats, plans, the packed payload, calibration.

  formats   int2/int3/int4/int8 (asymmetric, planar bit packing) and fp8
  schemes   quantize / dequantize references, KIVI-layout round trip
  plan      QuantPlan: format per (layer, kv head), group, residual, sinks
  transform centering, channel scaling and Hadamard rotation before quantizing
  payload   the packed cache leaves and how tokens are written (kernels)
  slots     slice / dequantize slot ranges of any payload
  calibration  activations, attention-output error, bit allocation

``from_config`` turns a run's ``quant`` config into a plan (or None).
"""

from __future__ import annotations

import logging

from lmcache_jax.quant.formats import FORMATS, Format, get_format
from lmcache_jax.quant.plan import QuantPlan

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "Format", "QuantPlan", "from_config", "get_format"]


def calibration_tokens_for(quant_config, lm):
  """Token ids of the config's calibration text (``calibration_text``, a
  Shakespeare work, default ``macbeth``; first ``calibration_tokens`` = 512)."""
  from lmcache_jax.data import shakespeare
  if lm.tokenizer is None:
    raise ValueError(
        f"model {lm.cfg.name} has no tokenizer to read calibration text "
        f"(key centering and the measuring policies need it); pass "
        f"calibration_tokens, or use --config.quant.center_keys=False with "
        f"--calibration=uniform")
  get = quant_config.get
  text = shakespeare.load_text(get("calibration_text", "macbeth") or "macbeth")
  return lm.tokenizer.encode(text)[:int(get("calibration_tokens", 512) or 512)]


def from_config(quant_config, lm, calibration_tokens=None) -> QuantPlan | None:
  """The quant plan a run asks for, or None for a full-precision cache.

  Fields of ``quant_config`` (a ConfigDict or dict): ``plan`` (path of a
  saved plan; wins over the rest), ``kv_bits`` (16 = off, else the average
  code bits), ``calibration`` (a policy name or call string, e.g.
  ``kvquant(sink_tokens=4)``), ``group_size`` (64), ``residual`` (0),
  ``sinks`` (0), ``copy_bits`` (16; 8 holds the sink and recent copies as
  int8 codes), ``rotate`` (True: Hadamard-rotate head vectors),
  ``center_keys`` (True: subtract each key channel's mean on the
  calibration text) and ``save_plan`` (path to save the chosen plan).
  ``calibration_tokens`` is real text (token ids) for centering and for
  policies that measure; None reads ``calibration_text`` (see
  ``calibration_tokens_for``).
  """
  get = quant_config.get
  if get("plan", ""):
    plan = QuantPlan.load(get("plan"), lm.cfg)
    print(f"loaded quant plan {get('plan')}: {plan.describe()}")
    return plan
  bits = float(get("kv_bits", 16))
  if bits >= 16:
    return None
  from lmcache_jax.quant import calibration
  from policies.registry import CALIBRATION
  policy = CALIBRATION.make(get("calibration", "uniform") or "uniform")
  center = bool(get("center_keys", True))
  # what the model produced on calibration text: read once, for centering
  # and for the policies that measure
  acts = None
  if center or policy.name != "uniform":
    if calibration_tokens is None:
      calibration_tokens = calibration_tokens_for(quant_config, lm)
    acts = calibration.collect(lm, calibration_tokens)
  storage = calibration.Storage(
      rotate=bool(get("rotate", True)),
      key_shift=calibration.key_means(acts) if center else None)
  plan = policy.calibrate(lm, acts, bits=bits,
                          group_size=int(get("group_size", 64)),
                          residual=int(get("residual", 0)),
                          sinks=int(get("sinks", 0)), storage=storage)
  plan = plan.replace(copy_bits=int(get("copy_bits", 16)))
  print(plan.describe())
  if get("save_plan", ""):
    print(f"saved quant plan to {plan.save(get('save_plan'))}")
  return plan
