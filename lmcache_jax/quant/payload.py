"""The quantized key or value payload of the cache, and how tokens enter it.

Layout (every leaf keeps the cache's slot axis at index 3):

  Packed (one per distinct format of the plan):
    data    [L, B, R, S, W]     uint32 packed codes (int) or float8 [.., Hd]
    scale   [L, B, R, S, Hd/g]  float16 per token and channel group
    zero    [L, B, R, S, Hd/g]  uint8 zero codes (``numerics.formats``; None
                                for fp8)
    heads   [L, B, R, 1]        int32 kv head held by each row (-1: padding)
    outlier_index [L, B, R, S, n] uint8 channels kept exact (the plan's
                                  ``outliers`` n; None when 0 or fp8)
    outlier_delta [L, B, R, S, n] float16 exact minus coded value there
  QuantizedKV:
    parts          tuple of Packed
    exact          [L, B, K, E, Hd]  copies of sink and recent tokens (E =
                                     sinks + residual) in the cache dtype,
                                     or uint8 codes of the stored vectors
                                     (the plan's copy_bits 8)
    exact_slots    [L, B, K, E]      slot each copy mirrors, -1 = none
    exact_scale    [L, B, K, E, Hd/g] float16 scales of int8 copies (else None)
    exact_zero     [L, B, K, E, Hd/g] uint8 zero codes of int8 copies
    channel_scale  [L, B, K, 1, Hd]  float32 key divisors (keys only, else None)
    channel_shift  [L, B, K, 1, Hd]  float32 key channel means (keys of a
                                     centered plan, else None)

Before quantizing, a key becomes ((k - shift) / scale) and, in a rotated
plan, every head vector is multiplied by the Hadamard matrix H
(``quant.transform``); reads undo both. Exact copies hold the vectors as
written.

R rows per part: the most heads any layer stores in that format, so a plan
mixing formats per (layer, head) allocates each format once, not per head.
Tokens are quantized per token (groups of channels) for keys and values
alike, so any single slot can be rewritten after an eviction. ``exact`` is
indexed by entry, not slot: ``exact_slots`` maps entries to slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmcache_jax.kernels.dequantize import unpack_dequantize
from lmcache_jax.kernels.quantize import quantize_pack
from lmcache_jax.numerics import formats, schemes
from lmcache_jax.quant import transform
from lmcache_jax.numerics.formats import Format, get_format
from lmcache_jax.quant.plan import QuantPlan

if TYPE_CHECKING:
  from lmcache_jax.arch.config import ModelConfig


@struct.dataclass
class Packed:
  data: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  heads: jax.Array
  fmt: Format = struct.field(pytree_node=False)
  group_size: int = struct.field(pytree_node=False)
  outlier_index: jax.Array | None = None
  outlier_delta: jax.Array | None = None

  @property
  def slot_leaves(self) -> tuple[str, ...]:
    """Names of the leaves indexed by slot, in a fixed order."""
    return tuple(name for name in ("data", "scale", "zero", "outlier_index",
                                   "outlier_delta")
                 if getattr(self, name) is not None)


@struct.dataclass
class QuantizedKV:
  parts: tuple[Packed, ...]
  exact: jax.Array
  exact_slots: jax.Array
  channel_scale: jax.Array | None
  sinks: int = struct.field(pytree_node=False)
  residual: int = struct.field(pytree_node=False)
  channel_shift: jax.Array | None = None
  rotate: bool = struct.field(pytree_node=False, default=False)
  exact_scale: jax.Array | None = None
  exact_zero: jax.Array | None = None

  @property
  def head_dim(self) -> int:
    return self.exact.shape[-1]

  @property
  def num_kv_heads(self) -> int:
    return self.exact.shape[-3]


def empty(cfg: ModelConfig, plan: QuantPlan, batch_size: int, capacity: int,
          dtype, *, keys: bool) -> QuantizedKV:
  """An empty payload for the plan (all layers stacked)."""
  plan.check(cfg)
  lead = (cfg.num_layers, batch_size)
  hd = cfg.head_dim
  groups = hd // plan.group_size
  parts = []
  for name in plan.distinct_formats():
    fmt = get_format(name)
    per_layer = [[k for k, f in enumerate(row) if f == name]
                 for row in plan.formats]
    rows = max(len(h) for h in per_layer)
    heads = np.full((cfg.num_layers, rows), -1, np.int32)
    for layer, h in enumerate(per_layer):
      heads[layer, :len(h)] = h
    shape = (*lead, rows, capacity)
    outliers = {}
    zero = jnp.zeros((*shape, groups), jnp.uint8) if fmt.has_zero else None
    if plan.outliers and fmt.has_zero:
      outliers = dict(
          outlier_index=jnp.zeros((*shape, plan.outliers), jnp.uint8),
          outlier_delta=jnp.zeros((*shape, plan.outliers), jnp.float16))
    parts.append(Packed(
        data=fmt.empty(shape, hd), scale=jnp.zeros((*shape, groups), jnp.float16), zero=zero,
        heads=jnp.broadcast_to(jnp.asarray(heads)[:, None, :, None],
                               (*lead, rows, 1)),
        fmt=fmt, group_size=plan.group_size, **outliers))
  num_exact = plan.sinks + plan.residual
  kv = (*lead, cfg.num_kv_heads)
  per_head = lambda a: jnp.broadcast_to(
      jnp.asarray(a, jnp.float32)[:, None, :, None, :], (*kv, 1, hd))
  channel_scale = per_head(plan.key_scale) if keys else None
  channel_shift = (per_head(plan.key_shift)
                   if keys and plan.key_shift is not None else None)
  copies = (*kv, num_exact)
  int8_copies = plan.copy_bits == 8
  return QuantizedKV(
      parts=tuple(parts),
      exact=jnp.zeros((*copies, hd), jnp.uint8 if int8_copies else dtype),
      exact_slots=jnp.full(copies, -1, jnp.int32),
      channel_scale=channel_scale, sinks=plan.sinks, residual=plan.residual,
      channel_shift=channel_shift, rotate=plan.rotate,
      exact_scale=(jnp.zeros((*copies, groups), jnp.float16)
                   if int8_copies else None),
      exact_zero=(jnp.zeros((*copies, groups), jnp.uint8)
                  if int8_copies else None))


def has_outliers(payload: QuantizedKV) -> bool:
  """True when some part keeps outlier entries beside its codes."""
  return any(part.outlier_index is not None for part in payload.parts)


def identity_rows(payload: QuantizedKV, part: Packed) -> bool:
  """True when the part's rows are the kv heads in order (a one-format plan:
  every layer lists all heads), so no gather/scatter by row is needed."""
  return len(payload.parts) == 1 and part.heads.shape[-2] == payload.num_kv_heads


def part_rows(heads: jax.Array, num_kv: int) -> jax.Array:
  """[B, R] head index per row, padding rows → num_kv (dropped by scatters)."""
  h = heads[..., 0]
  return jnp.where(h >= 0, h, num_kv)


def write(payload: QuantizedKV, x: jax.Array, token_positions: jax.Array,
          slots: jax.Array) -> QuantizedKV:
  """One layer: stores x [B, K, T, Hd] of tokens at positions [B, T] in slots [B, K, T].

  Slots out of range are dropped. Sink tokens (position < sinks) and the
  ``residual`` latest tokens of the step also get exact copies; older exact
  copies of the same slots are released first, since the slot now holds
  another token.
  """
  batch, num_kv, steps, _ = x.shape
  capacity = payload.parts[0].data.shape[-2]
  b = jnp.arange(batch)[:, None, None]
  stored = to_stored(payload, x)
  parts = []
  for part in payload.parts:
    if identity_rows(payload, part):
      xr, sr = stored, slots
    else:
      rows = part_rows(part.heads, num_kv)                   # [B, R]
      safe = jnp.minimum(rows, num_kv - 1)
      xr = jnp.take_along_axis(stored, safe[:, :, None, None], axis=1)
      sr = jnp.take_along_axis(slots, safe[:, :, None], axis=1)
      sr = jnp.where((rows < num_kv)[:, :, None], sr, capacity)
    new = {}
    if part.outlier_index is not None:
      xr, index, values = schemes.split_outliers(
          xr, part.outlier_index.shape[-1])
    new["data"], new["scale"], new["zero"] = quantize_pack(
        xr, fmt=part.fmt, group_size=part.group_size)
    if part.outlier_index is not None:
      new["outlier_index"] = index
      new["outlier_delta"] = schemes.outlier_deltas(
          values, index, new["scale"], new["zero"], part.fmt.bits,
          part.group_size)
    r = jnp.arange(part.heads.shape[-2])[None, :, None]
    parts.append(part.replace(**{
        name: getattr(part, name).at[b, r, sr].set(
            new[name].astype(getattr(part, name).dtype), mode="drop")
        for name in part.slot_leaves}))
  exact_slots = payload.exact_slots
  num_exact = exact_slots.shape[-1]
  if num_exact:
    valid = (token_positions >= 0)[:, None, :] & (slots < capacity)
    stale = jnp.any((exact_slots[..., None] == slots[:, :, None, :])
                    & valid[:, :, None, :], axis=-1)
    exact_slots = jnp.where(stale, -1, exact_slots)
    pos = token_positions
    latest = jnp.max(pos, axis=1, keepdims=True)
    entry = jnp.full_like(pos, num_exact)
    if payload.residual:
      recent = pos > latest - payload.residual
      entry = jnp.where(recent, payload.sinks + pos % payload.residual, entry)
    entry = jnp.where(pos < payload.sinks, pos, entry)
    entry = jnp.where(valid, entry[:, None, :], num_exact)    # [B, K, T]
    h = jnp.arange(num_kv)[None, :, None]
    put = lambda dst, src: (None if dst is None else
                            dst.at[b, h, entry].set(src, mode="drop"))
    code, scale, zero = _encode_copies(payload, x)
    payload = payload.replace(exact=put(payload.exact, code),
                              exact_scale=put(payload.exact_scale, scale),
                              exact_zero=put(payload.exact_zero, zero))
    exact_slots = exact_slots.at[b, h, entry].set(slots, mode="drop")
  return payload.replace(parts=tuple(parts), exact_slots=exact_slots)


def _encode_copies(payload: QuantizedKV, x: jax.Array):
  """(copy, scale, zero) of x [..., K, T, Hd] as the payload holds copies:
  x in its dtype (scale, zero None), or int8 codes of the stored vectors
  with their grids (centered and rotated like the packed codes: raw sink
  tokens have outlier channels that per-token int8 rounds visibly)."""
  if payload.exact_scale is None:
    return x.astype(payload.exact.dtype), None, None
  group = payload.head_dim // payload.exact_scale.shape[-1]
  stored = to_stored(payload, x)
  scale, zero = formats.int_params(stored, 8, group)
  codes = formats.int_codes(stored, scale, zero, 8, group).astype(jnp.uint8)
  return codes, scale, zero


def copies(payload: QuantizedKV) -> jax.Array:
  """The sink and recent copies [..., K, E, Hd] as float32 head vectors."""
  return _decode_copies(payload, payload.exact, payload.exact_scale,
                        payload.exact_zero)


def as_copies(payload: QuantizedKV, x: jax.Array) -> jax.Array:
  """Head vectors x [..., K, T, Hd] as an exact copy of them reads back
  (float32): what attention reads for a token inside the recent window."""
  return _decode_copies(payload, *_encode_copies(payload, x))


def _decode_copies(payload: QuantizedKV, code, scale, zero) -> jax.Array:
  if scale is None:
    return code.astype(jnp.float32)
  group = payload.head_dim // scale.shape[-1]
  return from_stored(payload, formats.from_codes(code, scale, zero, 8, group))


def with_copies(payload: QuantizedKV, x: jax.Array) -> QuantizedKV:
  """The payload with every copy replaced by x [..., K, E, Hd]."""
  code, scale, zero = _encode_copies(payload, x)
  return payload.replace(exact=code, exact_scale=scale, exact_zero=zero)


def to_stored(payload: QuantizedKV, x: jax.Array) -> jax.Array:
  """Head vectors [B, K, ..., Hd] as this payload quantizes them."""
  return transform.stored(x, payload.channel_scale, payload.channel_shift,
                          payload.rotate)


def from_stored(payload: QuantizedKV, x: jax.Array) -> jax.Array:
  """Dequantized stored vectors back to head vectors (float32)."""
  return transform.restored(x, payload.channel_scale, payload.channel_shift,
                            payload.rotate)


def mirrored(payload: QuantizedKV, capacity: int, *,
             sinks_only: bool = False) -> jax.Array:
  """[..., K, S] bool: slots whose token also has an exact copy (a sink
  copy when ``sinks_only``)."""
  exact_slots = payload.exact_slots
  if sinks_only:
    exact_slots = exact_slots[..., :payload.sinks]
  lead = exact_slots.shape[:-1]
  if not exact_slots.shape[-1]:
    return jnp.zeros((*lead, capacity), bool)
  target = jnp.where(exact_slots >= 0, exact_slots, capacity)
  flat = target.reshape(-1, target.shape[-1])
  marks = jnp.zeros((flat.shape[0], capacity), bool)
  marks = marks.at[jnp.arange(flat.shape[0])[:, None], flat].set(
      True, mode="drop")
  return marks.reshape(*lead, capacity)


def dequantize(payload: QuantizedKV, dtype, *, exact: bool = True) -> jax.Array:
  """One layer's dense [B, K, S, Hd] (``to_stored`` undone; exact copies
  overlaid unless ``exact=False``)."""
  batch, num_kv = payload.exact.shape[:2]
  head_dim = payload.head_dim
  capacity = payload.parts[0].data.shape[-2]
  out = jnp.zeros((batch, num_kv, capacity, head_dim), jnp.float32)
  b = jnp.arange(batch)[:, None]
  for part in payload.parts:
    dense = unpack_dequantize(part.data, part.scale, part.zero, fmt=part.fmt,
                              group_size=part.group_size, head_dim=head_dim)
    if part.outlier_index is not None:
      dense = schemes.add_outliers(dense.astype(jnp.float32),
                                   part.outlier_index, part.outlier_delta)
    if identity_rows(payload, part):
      out = dense.astype(jnp.float32)
    else:
      out = out.at[b, part_rows(part.heads, num_kv)].set(dense, mode="drop")
  out = from_stored(payload, out)
  if exact and payload.exact.shape[-2]:
    h = jnp.arange(num_kv)[None, :, None]
    target = jnp.where(payload.exact_slots >= 0, payload.exact_slots, capacity)
    out = out.at[b[:, :, None], h, target].set(copies(payload), mode="drop")
  return out.astype(dtype)

