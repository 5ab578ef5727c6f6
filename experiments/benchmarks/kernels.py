"""Kernel suite: fused decode attention over a 4-bit cache vs bf16 attention.

  python -m experiments.bench --suite=kernels                  # configs/bench/kernels.py
  python -m experiments.bench --suite=kernels --config=configs/bench/kernels.py:runlocal

Shapes from the config (``Shape``); by default Llama-3-8B attention shapes
(32 query heads, 8 kv heads, head dim 128), one decode token for each of 16
sequences over a 32K-token cache. First checks,
on the card, the Pallas kernels against their jnp references (quantize,
dequantize, fused attention); then times:

* copy: the card's copy bandwidth (read + write of a 2 GiB buffer);
* bf16: this project's dense ``attention.attend`` over a bfloat16 cache
  (XLA), with the per-slot attention mass;
* int4 kernel: the Pallas ``decode_attention`` call alone, for each block
  size tried, as a fraction of the copy bandwidth on the bytes it moves
  (packed codes, scales, zeros and positions read; logits written);
* int4 jnp reference: the same attention written in jnp (unpack, dequantize,
  einsum), compiled by XLA, for comparison with the kernel;
* int4 kernel with two scale groups per head (group 64), at its defaults;
* int4 attend: ``attention.attend_slots`` over a packed int4 cache (kernel
  + merge + mass), the end-to-end speed-up over bf16; once plain, once
  stored centered and rotated (keys centered on their channel means, head
  vectors Hadamard-rotated: the query and output rotations added); and both
  bf16 and rotated int4 without the per-slot mass (what policies that do
  not score by attention run). The packed layers are written through the
  cache's own write path (``attention.write_stacked``), as a prefill
  writes them.

Every time is per call with calls issued back to back (the device's time,
as a decode loop sees it); "ms alone" times single synchronized calls,
launch and synchronization latency included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
from experiments.benchmarks._checks import assert_matches_reference
from lmcache_jax import attention
from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.cache.kv_cache import init_cache
from lmcache_jax.kernels import decode_attention as da
from lmcache_jax.kernels import dequantize, quantize
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import FORMATS
from lmcache_jax.quant.plan import QuantPlan

FMT = FORMATS["int4"]
DEFAULT_BLOCK = da.default_tiling(FMT)[0]   # what calls without tiling use
_WRITE_CHUNK = 4096                          # tokens written per call


@dataclasses.dataclass(frozen=True)
class Shape:
  """One decode token for each of ``batch`` sequences over ``context``
  slots; ``group_size`` channels share a scale in the int4 rows."""
  batch: int
  kv_heads: int
  q_per_kv: int
  head_dim: int
  context: int
  group_size: int

  @classmethod
  def of(cls, config) -> Shape:
    fields = [f.name for f in dataclasses.fields(cls)]
    values = {name: config[name] for name in fields}
    bad = {k: v for k, v in values.items() if not isinstance(v, int) or v < 1}
    if bad:
      raise ValueError(f"kernel-suite shape fields must be positive ints, "
                       f"got {bad}")
    if values["head_dim"] % values["group_size"]:
      raise ValueError(f"group_size {values['group_size']} does not divide "
                       f"head_dim {values['head_dim']}")
    return cls(**values)

  @property
  def query_heads(self) -> int:
    return self.batch * self.kv_heads * self.q_per_kv


def logits_bytes(shape: Shape, block: int) -> int:
  """Bytes of the kernel's logits: a float16 offset per slot and query head,
  a float32 max per ``block`` slots and query head."""
  return (shape.query_heads * shape.context * 2
          + shape.query_heads * (shape.context // block) * 4)


def kernel_bytes(shape: Shape, kq, vq, slot_pos, block: int) -> int:
  """Bytes a kernel call moves: packed codes, scales, zeros and slot
  positions read, logits written (the partial softmax states it also
  writes, under 3% more, are left out)."""
  return (sum(a.nbytes for a in (*kq, *vq)) + slot_pos.nbytes
          + logits_bytes(shape, block))


def time_call(fn) -> tuple[float, float]:
  """(seconds per call back to back, seconds of a call timed alone): the
  first is the device's time (a decode loop's steady state), the second adds
  launch and synchronization latency."""
  alone = benchmarks.timed(fn, warmup=2, repeats=20)["median_s"]
  return benchmarks.timed_back_to_back(fn)["median_s"], alone


def timed_row(what: str, times: tuple[float, float], nbytes: int,
              bandwidth: float, baseline: tuple[float, float] | None = None
              ) -> dict:
  """One table row: time per call back to back (and alone), bytes moved,
  their rate and share of the copy bandwidth, and the speed-up over the
  ``baseline`` times (the bf16 attend), all from back-to-back times."""
  seconds, alone = times
  row = {"what": what, "ms": 1e3 * seconds, "ms alone": 1e3 * alone,
         "MB moved": nbytes / 1e6, "GB/s": nbytes / seconds / 1e9,
         "of copy bw": nbytes / seconds / bandwidth}
  if baseline is not None:
    row["speed-up vs bf16"] = baseline[0] / seconds
  return row


def check_kernels(shape: Shape) -> list[str]:
  """Kernel vs reference on the card; raises on a mismatch."""
  notes = []
  head_dim, group_size = shape.head_dim, shape.group_size
  x = jax.random.normal(jax.random.key(0), (4096, head_dim), jnp.float32)
  for name in ("int2", "int3", "int4", "int8"):
    fmt = FORMATS[name]
    got = quantize.quantize_pack(x, fmt=fmt, group_size=group_size)
    want = quantize.quantize_pack_reference(x, fmt=fmt, group_size=group_size)
    codes_got = schemes.dequantize(*got, fmt, group_size, head_dim)
    codes_want = schemes.dequantize(*want, fmt, group_size, head_dim)
    step = float(jnp.max(want[1].astype(jnp.float32)))
    off = float(jnp.max(jnp.abs(codes_got - codes_want)))
    if off > step * 1.01 + 1e-3:   # at most one rounding step apart
      raise AssertionError(f"quantize_pack {name}: off by {off} > step {step}")
    dense = dequantize.unpack_dequantize(*want, fmt=fmt, group_size=group_size,
                                         head_dim=head_dim)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(codes_want),
                               rtol=1e-6, atol=1e-6)
    notes.append(f"{name} quantize/dequantize ok (max diff {off:.2g})")
  return notes


def dense_dtype():
  """bfloat16, except on the CPU (no bf16 dot there) in --runlocal runs."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def dense_cache(shape: Shape):
  """Random keys and values [B, K, S, Hd] ~ N(0, 1)."""
  dims = (shape.batch, shape.kv_heads, shape.context, shape.head_dim)
  keys = jax.random.normal(jax.random.key(1), dims, dense_dtype())
  values = jax.random.normal(jax.random.key(2), dims, dense_dtype())
  return keys, values


def packed_layer(keys, values, plan: QuantPlan) -> attention.LayerKV:
  """``keys`` and ``values`` [B, K, S, Hd] (slot = position) written through
  the cache's write path into a one-layer cache stored as ``plan`` says:
  the layer as attention reads it."""
  batch, kv_heads, slots, head_dim = keys.shape
  cfg = one_layer_config(kv_heads, head_dim)
  cache = init_cache(cfg, batch, slots, keys.dtype, quant=plan)
  stacked = attention.LayerKV(cache.keys, cache.values, cache.positions,
                              cache.scores)
  write = jax.jit(attention.write_stacked, donate_argnums=0)
  for start in range(0, slots, _WRITE_CHUNK):
    stop = min(start + _WRITE_CHUNK, slots)
    positions = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32),
                                 (batch, stop - start))
    token_slots = jnp.broadcast_to(positions[:, None], (batch, kv_heads,
                                                        stop - start))
    tokens = lambda a: jnp.swapaxes(a[:, :, start:stop], 1, 2)  # noqa: E731
    stacked = write(stacked, 0, tokens(keys), tokens(values), positions,
                    token_slots)
  return benchmarks.sync(attention.layer_of(stacked, 0))


def one_layer_config(kv_heads: int, head_dim: int) -> ModelConfig:
  """A model config whose cache has the suite's attention shapes (the
  cache reads only layers, kv heads and head dim)."""
  return ModelConfig(name="kernel-suite", vocab_size=1, hidden_size=1,
                     intermediate_size=1, num_layers=1, num_heads=kv_heads,
                     num_kv_heads=kv_heads, head_dim=head_dim, max_context=1)


def several_groups_row(shape: Shape, keys, values, q, q_pos, slot_pos,
                       bandwidth) -> dict:
  """The kernel at its defaults with two scale groups per head (group 64 on
  head dim 128: the default group size on such a model), checked against
  its reference."""
  group = shape.head_dim // 2
  quantize = jax.jit(lambda a: schemes.quantize(a, FMT, group))
  kq, vq = quantize(keys), quantize(values)
  args = (q, q_pos, slot_pos, *kq, *vq)
  fn = jax.jit(lambda *a: da.decode_attention(*a, fmt=FMT, group_size=group))
  want = jax.jit(lambda *a: da.decode_attention_reference(
      *a, fmt=FMT, group_size=group))(*args)
  assert_matches_reference(fn(*args), want, rtol=2e-3, atol=2e-3,
                           what=f"group {group}")
  t = time_call(lambda: fn(*args))
  return timed_row(f"int4 kernel, group {group} (2 groups per head), defaults",
                   t, kernel_bytes(shape, kq, vq, slot_pos, DEFAULT_BLOCK),
                   bandwidth)


def run(config) -> dict:
  shape = Shape.of(config)
  notes = check_kernels(shape)
  bandwidth = benchmarks.copy_bandwidth(config.copy_bytes)
  batch, kv_heads, group = shape.batch, shape.kv_heads, shape.q_per_kv
  context, head_dim, group_size = shape.context, shape.head_dim, shape.group_size
  keys, values = dense_cache(shape)
  kq = jax.jit(lambda a: schemes.quantize(a, FMT, group_size))(keys)
  vq = jax.jit(lambda a: schemes.quantize(a, FMT, group_size))(values)
  q = jax.random.normal(jax.random.key(3), (batch, kv_heads, group, head_dim),
                        dense_dtype())
  q_pos = jnp.full((batch,), context - 1, jnp.int32)
  q_pos = q_pos.at[1 % batch].set(context // 3)      # ragged lengths
  slot_pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32),
                              (batch, kv_heads, context))
  reference = jax.jit(lambda *a: da.decode_attention_reference(
      *a, fmt=FMT, group_size=group_size))
  want = reference(q, q_pos, slot_pos, *kq, *vq)

  rows = [{"what": "copy bandwidth", "GB/s": bandwidth / 1e9}]
  t_ref = time_call(lambda: reference(q, q_pos, slot_pos, *kq, *vq))
  moved = kernel_bytes(shape, kq, vq, slot_pos, DEFAULT_BLOCK)
  best = None
  for block, warps, split, stages in config.blocks:
    fn = jax.jit(lambda *a, b=block, w=warps, s=split, st=stages:
                 da.decode_attention(*a, fmt=FMT, group_size=group_size,
                                     block_s=b, split_s=s, num_warps=w,
                                     num_stages=st))
    assert_matches_reference(fn(q, q_pos, slot_pos, *kq, *vq), want,
                             rtol=2e-3, atol=2e-3, what=f"block {block}")
    t = time_call(lambda: fn(q, q_pos, slot_pos, *kq, *vq))
    rows.append(timed_row(f"int4 kernel block {block} split {split} warps "
                          f"{warps} stages {stages}", t,
                          kernel_bytes(shape, kq, vq, slot_pos, block),
                          bandwidth))
    if best is None or t[0] < best[0]:
      best = (t[0], block, warps, split, stages)
  rows.append(timed_row("int4 jnp reference under XLA (unpack + attention)",
                        t_ref, moved, bandwidth))
  rows.append(several_groups_row(shape, keys, values, q, q_pos, slot_pos,
                                 bandwidth))
  notes.append(f"fused attention matches the reference at {batch}x{context}")
  rows += attend_rows(shape, keys, values, q, q_pos, slot_pos, want,
                      bandwidth, notes)
  notes.append(f"best block {best[1]}, warps {best[2]}, split {best[3]}, "
               f"stages {best[4]}")
  return {"rows": rows, "notes": notes,
          "shape": {**dataclasses.asdict(shape), "format": FMT.name}}


def attend_rows(shape: Shape, keys, values, q, q_pos, slot_pos, want,
                bandwidth, notes) -> list[dict]:
  """End to end: ``attention.attend_slots`` over a dense cache and over
  packed int4 ones (plain; centered and rotated), with and without the
  per-slot mass. Checks the plain int4 output against the kernel
  reference's ``want``; notes each int4 output's distance from the dense
  one (the quantization error)."""
  batch, kv_heads, group = shape.batch, shape.kv_heads, shape.q_per_kv
  head_dim, group_size = shape.head_dim, shape.group_size
  positions = slot_pos
  scores = jnp.zeros(positions.shape, jnp.float32)
  qt = q.reshape(batch, 1, kv_heads * group, head_dim)
  query_positions = q_pos[:, None]
  weights = jnp.ones((batch, 1), jnp.float32)
  dense = attention.LayerKV(keys, values, positions, scores)
  attend = jax.jit(attention.attend_slots)
  t_bf16 = time_call(lambda: attend(qt, dense, query_positions, weights))
  mass_bytes = positions.size * 4
  bf16_bytes = keys.nbytes + values.nbytes + positions.nbytes + mass_bytes
  dense_name = jnp.dtype(dense_dtype()).name
  rows = [timed_row(f"{dense_name} attend (XLA)", t_bf16, bf16_bytes,
                    bandwidth)]
  cfg = one_layer_config(kv_heads, head_dim)
  packed = packed_layer(keys, values, QuantPlan.uniform(
      cfg, FMT.name, group_size=group_size))
  out_dense, _ = attend(qt, dense, query_positions, weights)
  out_q, mass_q = attend(qt, packed, query_positions, weights)
  ref_out = want[0].reshape(batch, 1, kv_heads * group, head_dim)
  np.testing.assert_allclose(np.asarray(out_q, np.float32),
                             np.asarray(ref_out, np.float32), atol=2e-2)
  np.testing.assert_allclose(np.asarray(mass_q.sum(-1)), group, rtol=1e-3)
  t_q = time_call(lambda: attend(qt, packed, query_positions, weights))
  moved = kernel_bytes(shape, *_codes(packed), slot_pos, DEFAULT_BLOCK)
  attend_bytes = moved + logits_bytes(shape, DEFAULT_BLOCK) + mass_bytes
  rows.append(timed_row("int4 attend (kernel + merge + mass)", t_q,
                        attend_bytes, bandwidth, baseline=t_bf16))
  # keys centered on their channel means, head vectors Hadamard-rotated
  shift = jnp.mean(keys.astype(jnp.float32), axis=(0, 2))[None]  # [1, K, Hd]
  stored = packed_layer(keys, values, QuantPlan.uniform(
      cfg, FMT.name, group_size=group_size, rotate=True,
      key_shift=np.asarray(shift)))
  out_r, _ = attend(qt, stored, query_positions, weights)
  t_r = time_call(lambda: attend(qt, stored, query_positions, weights))
  rows.append(timed_row("int4 attend, rotated + centered storage", t_r,
                        attend_bytes, bandwidth, baseline=t_bf16))
  # policies that do not score by attention (full cache, windows) skip the
  # mass: no logits written or re-read
  attend_out = jax.jit(lambda *a: attention.attend_slots(*a, with_mass=False)[0])
  t_bf16_out = time_call(lambda: attend_out(qt, dense, query_positions,
                                            weights))
  t_r_out = time_call(lambda: attend_out(qt, stored, query_positions,
                                         weights))
  rows.append(timed_row(f"{dense_name} attend, no mass", t_bf16_out,
                        bf16_bytes - mass_bytes, bandwidth))
  rows.append(timed_row("int4 attend, rotated + centered, no mass", t_r_out,
                        moved - logits_bytes(shape, DEFAULT_BLOCK), bandwidth,
                        baseline=t_bf16_out))
  for what, out in (("int4", out_q), ("rotated + centered int4", out_r)):
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                - out_dense.astype(jnp.float32))))
    notes.append(f"{what} vs {dense_name} attention output max |diff| "
                 f"{err:.3g} (quantization error)")
  return rows


def _codes(layer: attention.LayerKV):
  """(codes, scales, zeros) of the keys' and of the values' one part."""
  (k,), (v,) = layer.keys.parts, layer.values.parts
  return (k.data, k.scale, k.zero), (v.data, v.scale, v.zero)
