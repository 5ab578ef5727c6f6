"""The quantized key or value payload of the cache, and how tokens enter it.

Layout:

  Packed (one per distinct format of the plan): a pool of P rows, each the
  codes of one (layer, kv head) stored in that format, every layer's rows
  side by side (slot axis at index 2, ``POOL_SLOT_AXIS``):
    data    [B, P, S, W]        uint32 packed codes (int) or float8 [.., Hd]
    scale   [B, P, S, Hd/g]     float16 per token and channel group
    zero    [B, P, S, Hd/g]     uint8 zero codes (``numerics.formats``; None
                                for fp8)
      keys of a ``key_layout="channel"`` plan (KIVI; ``token_group`` G > 1):
    scale   [B, P, S/G, Hd]     float16 per group of G slots and channel
    zero    [B, P, S/G, Hd]     float16 grid minimum there (a min/max grid)
    sealed  [B, P, S/G]         bool: the group's grid is set
    outlier_index [B, P, S, n]  uint8 channels kept exact (the plan's
                                ``outliers`` n; None when 0 or fp8)
    outlier_delta [B, P, S, n]  float16 exact minus coded value there
    heads   [L, B, R, 1]        int32 kv head held by row r of layer l
                                (-1: that layer stores fewer heads here)
    first   [L]                 int32 pool row of each layer's row 0: row r
                                of layer l is pool row first[l] + r
  QuantizedKV (slot axis at index 3):
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

A format's pool holds exactly the (layer, head) pairs the plan stores in
it, so a plan's bytes are the sum of its heads' bytes whatever its mix per
layer: widths can move between layers at equal bytes. A layer is read as R
rows (the most heads any layer stores in the format) from its ``first``
row; rows past its own (heads -1) belong to the next layer or lie past the
pool, and every read and write masks them.
Values, and keys by default, are quantized per token (groups of channels),
so any single slot can be rewritten after an eviction. ``exact`` is indexed
by entry, not slot: ``exact_slots`` maps entries to slots.

Per-channel keys (KIVI, ``token_group`` G > 1). Slots [jG, (j+1)G) form key
group j, whose G keys share one min/max grid per channel. A token's key is
written exact into its copy first (the plan keeps residual >= G); the group
is *sealed* (its grid computed, every slot's codes written) in the step
where either
  * every slot of the group holds a token (written in the step, or mirrored
    by a copy: in an unsealed group every token is, see below), or
  * one of its tokens would lose its only exact form: written in the step
    without a copy, or its copy's entry taken by a newer token.
Tokens entering in position order (prefill, decode) fill a group before its
first token leaves the window, so a group is sealed when full from its G
tokens as their copies hold them, in a chunk as in a decode loop, and an
unsealed group's tokens are always read from their copies. The grid spans
the group's tokens other than sink copies (read from their copies for
good; their codes are clamped onto it). An evicted slot of a sealed group
stays a masked hole; a later token written into a sealed group is coded on
that group's grid, clamped (grids never move once set, so nothing else is
re-rounded). Eviction can thus seal a group early (a token leaves before
the group is full): its grid is then set by the tokens it had, and later
ones are clamped onto it.
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


# Where a pool's slot leaves keep the slot axis ([B, P, S, ...]).
POOL_SLOT_AXIS = 2


@struct.dataclass
class Packed:
  data: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  heads: jax.Array
  first: jax.Array
  fmt: Format = struct.field(pytree_node=False)
  group_size: int = struct.field(pytree_node=False)
  outlier_index: jax.Array | None = None
  outlier_delta: jax.Array | None = None
  sealed: jax.Array | None = None
  token_group: int = struct.field(pytree_node=False, default=1)

  @property
  def slot_leaves(self) -> tuple[str, ...]:
    """Names of the leaves indexed by slot (or by group of ``token_group``
    slots), in a fixed order."""
    return tuple(name for name in ("data", "scale", "zero", "outlier_index",
                                   "outlier_delta", "sealed")
                 if getattr(self, name) is not None)

  @property
  def per_channel(self) -> bool:
    """Keys on per-channel grids over groups of ``token_group`` slots."""
    return self.token_group > 1


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
  if keys and plan.key_layout == "channel" and capacity % plan.key_group:
    raise ValueError(
        f"cache capacity {capacity} is not a multiple of the plan's key_group "
        f"{plan.key_group} (per-channel key groups cover whole groups of "
        f"slots); use e.g. {-(-capacity // plan.key_group) * plan.key_group}")
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
    counts = [len(h) for h in per_layer]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    shape = (batch_size, sum(counts), capacity)
    pool = dict(heads=jnp.broadcast_to(
                    jnp.asarray(heads)[:, None, :, None],
                    (cfg.num_layers, batch_size, rows, 1)),
                first=jnp.asarray(first), fmt=fmt)
    if keys and plan.key_layout == "channel":
      per_group = (*shape[:2], capacity // plan.key_group)
      parts.append(Packed(
          data=fmt.empty(shape, hd),
          scale=jnp.zeros((*per_group, hd), jnp.float16),
          zero=jnp.zeros((*per_group, hd), jnp.float16),
          sealed=jnp.zeros(per_group, bool), group_size=1,
          token_group=plan.key_group, **pool))
      continue
    outliers = {}
    zero = jnp.zeros((*shape, groups), jnp.uint8) if fmt.has_zero else None
    if plan.outliers and fmt.has_zero:
      outliers = dict(
          outlier_index=jnp.zeros((*shape, plan.outliers), jnp.uint8),
          outlier_delta=jnp.zeros((*shape, plan.outliers), jnp.float16))
    parts.append(Packed(
        data=fmt.empty(shape, hd),
        scale=jnp.zeros((*shape, groups), jnp.float16), zero=zero,
        group_size=plan.group_size, **pool, **outliers))
  lead = (cfg.num_layers, batch_size)
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


def per_channel(payload: QuantizedKV) -> bool:
  """True when some part holds keys on per-channel grids (KIVI)."""
  return any(part.per_channel for part in payload.parts)


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


def _at(a: jax.Array, layer: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)


def in_place(part: Packed) -> bool:
  """Whether a pool's slot leaves are read and written where they lie
  (per-token codes) rather than through a copy of the layer's rows."""
  return not part.per_channel


def pool_rows(part: Packed) -> jax.Array:
  """[R] pool row of each row of a layer view (its ``first`` + r), the pool
  size P where the layer has no such row (out of range: dropped by
  scatters, clipped by reads)."""
  rows = part.first + jnp.arange(part.heads.shape[-2])
  pool = part.data.shape[1]
  return jnp.where(part.heads[0, :, 0] >= 0, rows, pool)


def pool_sources(part: Packed) -> tuple[jax.Array, jax.Array]:
  """(layer [P], kv head [P]) each pool row holds."""
  heads = part.heads[:, 0, :, 0]                                 # [L, R]
  num_layers, rows = heads.shape
  pool = part.data.shape[1]
  at = jnp.where(heads >= 0, part.first[:, None] + jnp.arange(rows), pool)
  layer = jnp.zeros(pool, jnp.int32).at[at].set(
      jnp.broadcast_to(jnp.arange(num_layers)[:, None], at.shape),
      mode="drop")
  return layer, jnp.zeros(pool, jnp.int32).at[at].set(heads, mode="drop")


def _take_rows(a: jax.Array, rows: jax.Array) -> jax.Array:
  return jnp.take(a, rows, axis=1, mode="clip")


def layer_view(payload: QuantizedKV, layer: jax.Array, *,
               codes_in_place: bool = False) -> QuantizedKV:
  """Layer ``layer`` of a payload: its copies and maps [B, K, ...], and per
  part its R rows [B, R, S, ...] (``heads`` [B, R, 1], ``first`` a scalar).

  With ``codes_in_place`` the slot leaves of per-token parts stay the whole
  pool [B, P, S, ...], for kernels and scatters that index the layer's rows
  themselves (from ``first``): taking them out would copy the layer's
  codes, the bulk of the cache."""
  def part_view(part: Packed) -> Packed:
    view = part.replace(heads=_at(part.heads, layer),
                        first=_at(part.first, layer))
    if codes_in_place and in_place(part):
      return view
    rows = pool_rows(view)
    return view.replace(**{n: _take_rows(getattr(part, n), rows)
                           for n in part.slot_leaves})

  rest = jax.tree.map(lambda a: _at(a, layer), payload.replace(parts=()))
  return rest.replace(parts=tuple(part_view(p) for p in payload.parts))


def _put_layer(stacked: QuantizedKV, written: QuantizedKV,
               layer: jax.Array) -> QuantizedKV:
  """``stacked`` with layer ``layer`` replaced by ``written`` (a
  ``layer_view(..., codes_in_place=True)`` after ``write``)."""
  put = lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, layer, 0)  # noqa: E731
  parts = []
  for old, new in zip(stacked.parts, written.parts):
    kept = dict(heads=old.heads, first=old.first)
    if in_place(old):
      parts.append(new.replace(**kept))
      continue
    rows = pool_rows(new)
    parts.append(old.replace(**{
        n: getattr(old, n).at[:, rows].set(getattr(new, n), mode="drop")
        for n in old.slot_leaves}))
  rest = jax.tree.map(put, stacked.replace(parts=()), written.replace(parts=()))
  return rest.replace(parts=tuple(parts))


def write(payload: QuantizedKV, x: jax.Array, token_positions: jax.Array,
          slots: jax.Array, layer: jax.Array | None = None) -> QuantizedKV:
  """One layer: stores x [B, K, T, Hd] of tokens at positions [B, T] in slots [B, K, T].

  Slots out of range are dropped. Sink tokens (position < sinks) and the
  ``residual`` latest tokens of the step also get exact copies; older exact
  copies of the same slots are released first, since the slot now holds
  another token. Per-channel key parts are written as the module docstring
  says (sealing groups from the copies held before the step).

  ``payload`` is a ``layer_view`` without ``layer``; with it, the whole
  payload, of which this layer is written: per-token codes are scattered
  into their pools in place, the rest (copies, per-channel parts) through a
  copy of the layer's leaves.
  """
  if layer is not None:
    view = layer_view(payload, layer, codes_in_place=True)
    return _put_layer(payload, _write_layer(view, x, token_positions, slots),
                      layer)
  return _write_layer(payload, x, token_positions, slots)


def _write_layer(payload: QuantizedKV, x, token_positions, slots):
  """``write`` into one layer's view (per-token codes in their rows or,
  from ``layer_view(..., codes_in_place=True)``, in the whole pool)."""
  batch, num_kv, steps, _ = x.shape
  capacity = payload.parts[0].data.shape[POOL_SLOT_AXIS]
  b = jnp.arange(batch)[:, None, None]
  valid = (token_positions >= 0)[:, None, :] & (slots < capacity)   # [B, K, T]
  entry, exact_slots = _copy_entries(payload, token_positions, slots, valid)
  stored = to_stored(payload, x)
  parts = []
  for part in payload.parts:
    if part.per_channel:
      parts.append(_write_channels(payload, part, x, slots, valid,
                                   exact_slots))
      continue
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
    r = _leaf_rows(part)[None, :, None]
    index = (b, r, sr)
    parts.append(part.replace(**{
        name: getattr(part, name).at[index].set(
            new[name].astype(getattr(part, name).dtype), mode="drop")
        for name in part.slot_leaves}))
  if entry is not None:
    h = jnp.arange(num_kv)[None, :, None]
    put = lambda dst, src: (None if dst is None else
                            dst.at[b, h, entry].set(src, mode="drop"))
    code, scale, zero = _encode_copies(payload, x)
    payload = payload.replace(exact=put(payload.exact, code),
                              exact_scale=put(payload.exact_scale, scale),
                              exact_zero=put(payload.exact_zero, zero))
  return payload.replace(parts=tuple(parts), exact_slots=exact_slots)


def _leaf_rows(part: Packed) -> jax.Array:
  """[R] where a layer view's rows lie in its slot leaves: pool rows when
  the leaves are the whole pool (``codes_in_place``), else 0..R-1. With a
  pool of exactly R rows the two cannot be told apart and need not be: one
  layer then holds the whole pool from row 0, so both give the same rows."""
  rows = part.heads.shape[-2]
  return pool_rows(part) if part.data.shape[1] != rows else jnp.arange(rows)


def _copy_entries(payload: QuantizedKV, token_positions, slots, valid):
  """(entry [B, K, T] each token's copy goes to, E = none; the exact_slots
  after the step), or (None, exact_slots) for a payload without copies."""
  exact_slots = payload.exact_slots
  num_exact = exact_slots.shape[-1]
  if not num_exact:
    return None, exact_slots
  batch, num_kv, _ = slots.shape
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
  entry = jnp.where(valid, entry[:, None, :], num_exact)      # [B, K, T]
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(num_kv)[None, :, None]
  return entry, exact_slots.at[b, h, entry].set(slots, mode="drop")


def _slot_map(index: jax.Array, values: jax.Array, capacity: int,
              fill) -> jax.Array:
  """[B, R, S]: ``values`` [B, R, N] (broadcast) scattered to the slots
  ``index`` [B, R, N] (out of range: dropped), ``fill`` elsewhere."""
  batch, rows, _ = index.shape
  out = jnp.full((batch, rows, capacity + 1), fill,
                 jnp.asarray(values).dtype)
  index = jnp.where((index >= 0) & (index < capacity), index, capacity)
  out = out.at[jnp.arange(batch)[:, None, None],
               jnp.arange(rows)[None, :, None], index].set(
                   jnp.broadcast_to(values, index.shape))
  return out[..., :capacity]


def _write_channels(payload: QuantizedKV, part: Packed, x, slots, valid,
                    exact_slots) -> Packed:
  """The per-channel key part after this step's tokens x [B, K, T, Hd]
  entered ``slots`` [B, K, T] (``valid`` [B, K, T]) and the copies moved to
  ``exact_slots`` [B, K, E] (the module docstring has the rules)."""
  batch, num_kv, steps, head_dim = x.shape
  capacity = part.data.shape[-2]
  group = part.token_group
  num_groups = capacity // group
  rows = part.heads.shape[-2]
  # Every vector is coded as its copy holds it, so a group sealed in a chunk
  # from the step's tokens gets the grid a decode loop computes from copies.
  step_vec = to_stored(payload, as_copies(payload, x))          # [B, K, T, Hd]
  copy_vec = to_stored(payload, copies(payload))                # [B, K, E, Hd]
  before = payload.exact_slots
  if identity_rows(payload, part):
    take = lambda a, fill: a                                    # noqa: E731
  else:
    head = part_rows(part.heads, num_kv)                        # [B, R]
    pad = head >= num_kv
    safe = jnp.minimum(head, num_kv - 1)

    def take(a, fill):
      got = jnp.take_along_axis(
          a, safe.reshape(*safe.shape, *([1] * (a.ndim - 2))), axis=1)
      mask = pad.reshape(*pad.shape, *([1] * (a.ndim - 2)))
      return got if fill is None else jnp.where(mask, fill, got)
  step_vec, copy_vec = take(step_vec, None), take(copy_vec, None)
  slots, valid = take(slots, capacity), take(valid, False)
  before, after = take(before, -1), take(exact_slots, -1)
  num_exact = before.shape[-1]
  # where each slot's vector is this step: the step's token t, or copy e
  step_of = _slot_map(jnp.where(valid, slots, capacity),
                      jnp.arange(steps, dtype=jnp.int32), capacity, -1)
  copy_of = _slot_map(before, jnp.arange(num_exact, dtype=jnp.int32),
                      capacity, -1)
  mirrored = _slot_map(after, True, capacity, False)
  sink = _slot_map(after[..., :payload.sinks], True, capacity, False)
  held = (step_of >= 0) | (copy_of >= 0)
  leaving = held & ~mirrored
  by_group = lambda a: a.reshape(batch, rows, num_groups, group)  # noqa: E731
  seal = ~part.sealed & (jnp.all(by_group(held), axis=-1)
                         | jnp.any(by_group(leaving), axis=-1))
  # At most 2T groups seal in a step: those of its slots, and those of the
  # copies its tokens displace.
  count = min(num_groups, 2 * steps)
  order = jnp.argsort(~seal, axis=-1, stable=True)[..., :count]
  chosen = jnp.where(jnp.take_along_axis(seal, order, axis=-1), order,
                     num_groups)                                # [B, R, C]
  members = chosen[..., None] * group + jnp.arange(group)       # [B, R, C, G]
  flat = jnp.minimum(members, capacity - 1).reshape(batch, rows, -1)
  t = jnp.take_along_axis(step_of, flat, axis=-1)
  e = jnp.take_along_axis(copy_of, flat, axis=-1)
  gather = lambda v, i: jnp.take_along_axis(                    # noqa: E731
      v, jnp.maximum(i, 0)[..., None], axis=2)
  vec = jnp.where((t >= 0)[..., None], gather(step_vec, t),
                  jnp.where((e >= 0)[..., None], gather(copy_vec, e), 0.0))
  has = ((t >= 0) | (e >= 0)) & (members.reshape(flat.shape) < capacity)
  in_grid = has & ~jnp.take_along_axis(sink, flat, axis=-1)
  shape = (batch, rows, count, group)
  words, scale, low = schemes.channel_quantize(
      vec.reshape(*shape, head_dim), in_grid.reshape(shape), part.fmt)
  b = jnp.arange(batch)[:, None, None]
  r = jnp.arange(rows)[None, :, None]
  data = part.data.at[b, r, jnp.where(has, flat, capacity)].set(
      words.reshape(batch, rows, -1, words.shape[-1]), mode="drop")
  # tokens written into groups sealed before the step: that group's grid
  g = jnp.minimum(slots // group, num_groups - 1)               # [B, R, T]
  onto = valid & jnp.take_along_axis(part.sealed, g, axis=-1)
  grid = lambda a: jnp.take_along_axis(a, g[..., None], axis=2)  # noqa: E731
  data = data.at[b, r, jnp.where(onto, slots, capacity)].set(
      schemes.channel_codes(step_vec, grid(part.scale), grid(part.zero),
                            part.fmt), mode="drop")
  return part.replace(
      data=data,
      scale=part.scale.at[b, r, chosen].set(scale, mode="drop"),
      zero=part.zero.at[b, r, chosen].set(low, mode="drop"),
      sealed=part.sealed.at[b, r, chosen].set(True, mode="drop"))


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
    if part.per_channel:
      dense = schemes.channel_dequantize(part.data, part.scale, part.zero,
                                         part.fmt, head_dim)
    else:
      dense = unpack_dequantize(part.data, part.scale, part.zero,
                                fmt=part.fmt, group_size=part.group_size,
                                head_dim=head_dim)
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


def dequantize_layers(payload: QuantizedKV, dtype, *,
                      exact: bool = True) -> jax.Array:
  """Every layer's dense [L, B, K, S, Hd] (``dequantize`` of each
  ``layer_view``)."""
  return jax.vmap(lambda l: dequantize(layer_view(payload, l), dtype,
                                       exact=exact))(
      jnp.arange(payload.exact.shape[0]))


def _sequence(payload: QuantizedKV, row: jax.Array) -> QuantizedKV:
  """The payload of sequence ``row`` alone (batch 1)."""
  take = lambda axis: lambda a: jax.lax.dynamic_slice_in_dim(  # noqa: E731
      a, row, 1, axis=axis)
  parts = tuple(part.replace(
      heads=take(1)(part.heads),
      **{n: take(0)(getattr(part, n)) for n in part.slot_leaves})
      for part in payload.parts)
  rest = jax.tree.map(take(1), payload.replace(parts=()))
  return rest.replace(parts=parts)


def prefix_copies(payload: QuantizedKV, row: jax.Array,
                  n: jax.Array) -> QuantizedKV:
  """A payload whose sequence ``row`` holds the copies a prefix of ``n``
  tokens in slots 0..n-1 (slot = position) has after a prefill: its sinks
  and its ``residual`` latest tokens, in the entries ``write`` gives them,
  read from their codes (a store holds codes only)."""
  one = _sequence(payload, row)
  dense = dequantize_layers(one, jnp.float32, exact=False)[:, 0]  # [L, K, S, Hd]
  # layers in the place of sequences: [L, K, ...] copies, maps, key scales
  one = jax.tree.map(lambda a: a[:, 0], one.replace(parts=()))
  entry = jnp.arange(payload.exact.shape[-2])
  latest = (n - 1) - jnp.mod(n - 1 - (entry - payload.sinks),
                             max(payload.residual, 1))
  pos = jnp.where(entry < payload.sinks, entry, latest)
  keep = (pos >= 0) & (pos < n) & ((entry < payload.sinks)
                                   | (pos >= payload.sinks))
  slots = jnp.broadcast_to(jnp.where(keep, pos, -1), one.exact_slots.shape)
  code, scale, zero = _encode_copies(
      one, jnp.take(dense, jnp.maximum(slots[0, 0], 0), axis=-2))
  put = lambda dst, src: (None if dst is None else            # noqa: E731
                          dst.at[:, row].set(src.astype(dst.dtype)))
  return payload.replace(exact=put(payload.exact, code),
                         exact_scale=put(payload.exact_scale, scale),
                         exact_zero=put(payload.exact_zero, zero),
                         exact_slots=put(payload.exact_slots, slots))
