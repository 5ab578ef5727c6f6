"""Kernel suite: fused decode attention over a 4-bit cache vs bf16 attention.

  python -m experiments.bench --suite=kernels
  python -m experiments.benchmarks.kernels [OUT.json]   # same, without absl
  python -m experiments.benchmarks.kernels --runlocal   # small shapes, any backend

Llama-3-8B attention shapes (32 query heads, 8 kv heads, head dim 128), one
decode token for each of 16 sequences over a 32K-token cache. First checks,
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
* int4 attend: ``attention.attend`` over a packed int4 cache (kernel + merge
  + mass), the end-to-end speed-up over bf16; once plain, once stored as the
  default plan stores it (keys centered, vectors Hadamard-rotated: the query
  and output rotations added); and both bf16 and rotated int4 without the
  per-slot mass (what policies that do not score by attention run).

Every time is per call with calls issued back to back (the device's time,
as a decode loop sees it); "ms alone" times single synchronized calls,
launch and synchronization latency included.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
from experiments.benchmarks._checks import assert_matches_reference
from lmcache_jax.kernels import decode_attention as da
from lmcache_jax.kernels import dequantize, quantize
from lmcache_jax import attention
from lmcache_jax.quant import payload as qpayload
from lmcache_jax.numerics import schemes
from lmcache_jax.quant import transform
from lmcache_jax.numerics.formats import FORMATS

BATCH, KV_HEADS, GROUP, HEAD_DIM, CONTEXT = 16, 8, 4, 128, 32768
FMT, GROUP_SIZE = FORMATS["int4"], 128
if "--runlocal" in sys.argv:   # a seconds-long smoke run of the script's logic
  BATCH, KV_HEADS, CONTEXT = 2, 2, 1024
# (block, warps, split, pipeline stages); the first is the kernel's default
BLOCKS = ((128, 2, 512, 3), (64, 1, 512, 3), (64, 1, 2048, 3),
          (128, 2, 1024, 3), (128, 4, 512, 3), (128, 2, 512, 2))
DEFAULT_BLOCK = da.default_tiling(FMT)[0]   # what calls without tiling use


def logits_bytes(block: int) -> int:
  """Bytes of the kernel's logits: a float16 offset per slot and query head,
  a float32 max per ``block`` slots and query head."""
  heads = BATCH * KV_HEADS * GROUP
  return heads * CONTEXT * 2 + heads * (CONTEXT // block) * 4


def kernel_bytes(kq, vq, slot_pos, block: int) -> int:
  """Bytes a kernel call moves: packed codes, scales, zeros and slot
  positions read, logits written (the partial softmax states it also
  writes, under 3% more, are left out)."""
  return (sum(a.nbytes for a in (*kq, *vq)) + slot_pos.nbytes
          + logits_bytes(block))


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


def check_kernels() -> list[str]:
  """Kernel vs reference on the card; raises on a mismatch."""
  notes = []
  x = jax.random.normal(jax.random.key(0), (4096, HEAD_DIM), jnp.float32)
  for name in ("int2", "int3", "int4", "int8"):
    fmt = FORMATS[name]
    got = quantize.quantize_pack(x, fmt=fmt, group_size=GROUP_SIZE)
    want = quantize.quantize_pack_reference(x, fmt=fmt, group_size=GROUP_SIZE)
    codes_got = schemes.dequantize(*got, fmt, GROUP_SIZE, HEAD_DIM)
    codes_want = schemes.dequantize(*want, fmt, GROUP_SIZE, HEAD_DIM)
    step = float(jnp.max(want[1].astype(jnp.float32)))
    off = float(jnp.max(jnp.abs(codes_got - codes_want)))
    if off > step * 1.01 + 1e-3:   # at most one rounding step apart
      raise AssertionError(f"quantize_pack {name}: off by {off} > step {step}")
    dense = dequantize.unpack_dequantize(*want, fmt=fmt, group_size=GROUP_SIZE,
                                         head_dim=HEAD_DIM)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(codes_want),
                               rtol=1e-6, atol=1e-6)
    notes.append(f"{name} quantize/dequantize ok (max diff {off:.2g})")
  return notes


def dense_dtype():
  """bfloat16, except on the CPU (no bf16 dot there) in --runlocal runs."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def dense_cache(slots):
  shape = (BATCH, KV_HEADS, slots, HEAD_DIM)
  keys = jax.random.normal(jax.random.key(1), shape, dense_dtype())
  values = jax.random.normal(jax.random.key(2), shape, dense_dtype())
  return keys, values


def several_groups_row(keys, values, q, q_pos, slot_pos, bandwidth) -> dict:
  """The kernel at its defaults with two scale groups per head (group 64 on
  head dim 128: the default group size on such a model), checked against
  its reference."""
  group = HEAD_DIM // 2
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
                   t, kernel_bytes(kq, vq, slot_pos, DEFAULT_BLOCK), bandwidth)


def run(config=None) -> dict:
  del config
  notes = check_kernels()
  bandwidth = benchmarks.copy_bandwidth(2**31 if CONTEXT == 32768 else 2**23)
  keys, values = dense_cache(CONTEXT)
  kq = jax.jit(lambda a: schemes.quantize(a, FMT, GROUP_SIZE))(keys)
  vq = jax.jit(lambda a: schemes.quantize(a, FMT, GROUP_SIZE))(values)
  q = jax.random.normal(jax.random.key(3), (BATCH, KV_HEADS, GROUP, HEAD_DIM),
                        dense_dtype())
  q_pos = jnp.full((BATCH,), CONTEXT - 1, jnp.int32)
  q_pos = q_pos.at[1].set(CONTEXT // 3)          # ragged lengths
  slot_pos = jnp.broadcast_to(jnp.arange(CONTEXT, dtype=jnp.int32),
                              (BATCH, KV_HEADS, CONTEXT))
  want = jax.jit(lambda *a: da.decode_attention_reference(
      *a, fmt=FMT, group_size=GROUP_SIZE))(q, q_pos, slot_pos, *kq, *vq)

  rows = [{"what": "copy bandwidth", "GB/s": bandwidth / 1e9}]
  reference = jax.jit(lambda *a: da.decode_attention_reference(
      *a, fmt=FMT, group_size=GROUP_SIZE))
  t_ref = time_call(lambda: reference(q, q_pos, slot_pos, *kq, *vq))
  moved = kernel_bytes(kq, vq, slot_pos, DEFAULT_BLOCK)
  best = None
  for block, warps, split, stages in BLOCKS:
    fn = jax.jit(lambda *a, b=block, w=warps, s=split, st=stages:
                 da.decode_attention(*a, fmt=FMT, group_size=GROUP_SIZE,
                                     block_s=b, split_s=s, num_warps=w,
                                     num_stages=st))
    assert_matches_reference(fn(q, q_pos, slot_pos, *kq, *vq), want,
                             rtol=2e-3, atol=2e-3, what=f"block {block}")
    t = time_call(lambda: fn(q, q_pos, slot_pos, *kq, *vq))
    rows.append(timed_row(f"int4 kernel block {block} split {split} warps "
                          f"{warps} stages {stages}", t,
                          kernel_bytes(kq, vq, slot_pos, block), bandwidth))
    if best is None or t[0] < best[0]:
      best = (t[0], block, warps, split, stages)
  rows.append(timed_row("int4 jnp reference under XLA (unpack + attention)",
                        t_ref, moved, bandwidth))
  rows.append(several_groups_row(keys, values, q, q_pos, slot_pos, bandwidth))
  notes.append(f"fused attention matches the reference at {BATCH}x{CONTEXT}")

  # End to end: attention.attend over a dense bf16 and a packed int4 cache.
  positions = slot_pos
  scores = jnp.zeros(positions.shape, jnp.float32)
  qt = q.reshape(BATCH, 1, KV_HEADS * GROUP, HEAD_DIM)
  query_positions = q_pos[:, None]
  weights = jnp.ones((BATCH, 1), jnp.float32)
  dense = attention.LayerKV(keys, values, positions, scores)
  attend = jax.jit(attention.attend_slots)
  t_bf16 = time_call(lambda: attend(qt, dense, query_positions, weights))
  mass_bytes = positions.size * 4
  bf16_bytes = keys.nbytes + values.nbytes + positions.nbytes + mass_bytes
  rows.append(timed_row(f"{jnp.dtype(dense_dtype()).name} attend (XLA)",
                        t_bf16, bf16_bytes, bandwidth))
  heads = jnp.broadcast_to(jnp.arange(KV_HEADS, dtype=jnp.int32)[None, :, None],
                           (BATCH, KV_HEADS, 1))
  def payload(data, scale, zero, channel, shift=None, rotate=False):
    part = qpayload.Packed(data, scale, zero, heads, FMT, GROUP_SIZE)
    return qpayload.QuantizedKV(
        (part,), jnp.zeros((BATCH, KV_HEADS, 0, HEAD_DIM), dense_dtype()),
        jnp.zeros((BATCH, KV_HEADS, 0), jnp.int32), channel, 0, 0,
        shift, rotate)
  ones = jnp.ones((BATCH, KV_HEADS, 1, HEAD_DIM), jnp.float32)
  packed = attention.LayerKV(payload(*kq, ones), payload(*vq, None), positions,
                             scores)
  out_dense, mass_dense = attend(qt, dense, query_positions, weights)
  out_q, mass_q = attend(qt, packed, query_positions, weights)
  ref_out = want[0].reshape(BATCH, 1, KV_HEADS * GROUP, HEAD_DIM)
  np.testing.assert_allclose(np.asarray(out_q, np.float32),
                             np.asarray(ref_out, np.float32), atol=2e-2)
  np.testing.assert_allclose(np.asarray(mass_q.sum(-1)), GROUP, rtol=1e-3)
  t_q = time_call(lambda: attend(qt, packed, query_positions, weights))
  attend_bytes = moved + logits_bytes(DEFAULT_BLOCK) + mass_bytes  # re-read
  rows.append(timed_row("int4 attend (kernel + merge + mass)", t_q,
                        attend_bytes, bandwidth, baseline=t_bf16))
  # the default storage: keys centered, head vectors Hadamard-rotated
  shift = jnp.mean(keys.astype(jnp.float32), axis=2, keepdims=True)
  quantize = jax.jit(lambda a, s: schemes.quantize(
      transform.stored(a, shift=s, rotated=True), FMT, GROUP_SIZE))
  stored = attention.LayerKV(
      payload(*quantize(keys, shift), ones, shift, True),
      payload(*quantize(values, None), None, None, True), positions, scores)
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
  plain_bytes = bf16_bytes - mass_bytes
  packed_bytes = moved - logits_bytes(DEFAULT_BLOCK)
  rows.append(timed_row(f"{jnp.dtype(dense_dtype()).name} attend, no mass",
                        t_bf16_out, plain_bytes, bandwidth))
  rows.append(timed_row("int4 attend, rotated + centered, no mass", t_r_out,
                        packed_bytes, bandwidth, baseline=t_bf16_out))
  err_r = float(jnp.max(jnp.abs(out_r.astype(jnp.float32)
                                - out_dense.astype(jnp.float32))))
  notes.append(f"rotated + centered int4 vs bf16 output max |diff| {err_r:.3g}")
  err = float(jnp.max(jnp.abs(out_q.astype(jnp.float32)
                              - out_dense.astype(jnp.float32))))
  notes.append(f"int4 vs bf16 attention output max |diff| {err:.3g} "
               f"(quantization error); best block {best[1]}, warps {best[2]}, "
               f"split {best[3]}, stages {best[4]}")
  return {"rows": rows, "notes": notes,
          "shape": {"batch": BATCH, "kv_heads": KV_HEADS, "q_per_kv": GROUP,
                    "head_dim": HEAD_DIM, "context": CONTEXT,
                    "format": FMT.name, "group_size": GROUP_SIZE}}


def main() -> None:
  print(f"device: {benchmarks.device_name()}", flush=True)
  out = run()
  print("\n".join(out["notes"]))
  cols = list(dict.fromkeys(k for r in out["rows"] for k in r))
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in out["rows"]:
    print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float)
                            else str(r.get(c, "")) for c in cols) + " |")
  paths = [a for a in sys.argv[1:] if not a.startswith("--")]
  if paths:
    with open(paths[0], "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
