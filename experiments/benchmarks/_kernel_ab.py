"""A/B timing of the fused int4 decode-attention kernel against another
version of its file, on the same inputs in one process:

  git show REV:lmcache_jax/kernels/decode_attention.py > /tmp/other.py
  PYTHONPATH=. python3 experiments/benchmarks/_kernel_ab.py /tmp/other.py \
      [BLOCK,WARPS,SPLIT[,STAGES] ...] [--format=int4] [--group=128] [--small]
      [--rounds=2] [--other-float16-zeros]

The other file is imported beside this tree (it uses this tree's other
modules). Shapes as the kernel suite: 16 sequences x 8 kv heads x 32K slots,
4 query heads per kv head, head dim 128, int4 (or ``--format``) with one
scale and zero code per token and head (or per ``--group`` channels). Each
configuration runs ``--rounds`` rounds (2), alternating the two versions;
each line is the time per call issued back to back (the median of 5
batches of 20) and the largest difference from the jnp reference over out,
lse and logits (since 6b9d9ee the logits carry their float16 offsets'
rounding, ~4e-3 at these shapes). ``--other-float16-zeros``: the
other version predates uint8 zero codes (before 8aa1666) and gets each
group's zero as a float16 value of the same grid.
"""
import importlib.util
import inspect
import sys

import jax
import jax.numpy as jnp

from experiments import benchmarks
from lmcache_jax.kernels import decode_attention as this
from lmcache_jax.numerics import schemes
from lmcache_jax.numerics.formats import get_format

BATCH, KV_HEADS, GROUP, HEAD_DIM, CONTEXT = 16, 8, 4, 128, 32768
if "--small" in sys.argv:   # seconds-long check of the script on any backend
  BATCH, KV_HEADS, CONTEXT = 2, 2, 1024


def load(path):
  spec = importlib.util.spec_from_file_location("other_decode_attention", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def main():
  paths_and_configs = [a for a in sys.argv[1:] if not a.startswith("--")]
  other = load(paths_and_configs[0])
  configs = [tuple(int(v) for v in a.split(","))
             for a in paths_and_configs[1:]]
  configs = configs or [(64, 4, 1024)]
  fmt = get_format(benchmarks.flag("format", "int4"))
  group = int(benchmarks.flag("group", str(HEAD_DIM)))
  shape = (BATCH, KV_HEADS, CONTEXT, HEAD_DIM)
  quantize = jax.jit(lambda a: schemes.quantize(a, fmt, group))
  kq = quantize(jax.random.normal(jax.random.key(1), shape, jnp.bfloat16))
  vq = quantize(jax.random.normal(jax.random.key(2), shape, jnp.bfloat16))
  q = jax.random.normal(jax.random.key(3), (BATCH, KV_HEADS, GROUP, HEAD_DIM),
                        jnp.bfloat16)
  q_pos = jnp.full((BATCH,), CONTEXT - 1, jnp.int32).at[1].set(CONTEXT // 3)
  slot_pos = jnp.broadcast_to(jnp.arange(CONTEXT, dtype=jnp.int32),
                              (BATCH, KV_HEADS, CONTEXT))
  args = (q, q_pos, slot_pos, *kq, *vq)
  other_args = args
  if "--other-float16-zeros" in sys.argv:
    as_f16 = lambda p: (p[0], p[1], schemes.zero_value(
        p[1], p[2], fmt.bits).astype(jnp.float16))
    other_args = (q, q_pos, slot_pos, *as_f16(kq), *as_f16(vq))
  want = jax.jit(lambda *a: this.decode_attention_reference(
      *a, fmt=fmt, group_size=group))(*args)
  print(f"device: {benchmarks.device_name()}")
  for config in configs:
    for _ in range(int(benchmarks.flag("rounds", "2"))):
      for name, module, inputs in (("other", other, other_args),
                                   ("this tree", this, args)):
        knobs = dict(zip(("block_s", "num_warps", "split_s", "num_stages"),
                         config))
        accepted = inspect.signature(module.decode_attention).parameters
        knobs = {k: v for k, v in knobs.items() if k in accepted}
        fn = jax.jit(lambda *a, m=module, k=knobs: m.decode_attention(
            *a, fmt=fmt, group_size=group, **k))
        got = fn(*inputs)
        dense = lambda x: x.dense() if hasattr(x, "dense") else x
        err = max(float(jnp.max(jnp.abs(dense(g) - w)))
                  for g, w in zip(got, want) if g is not None)
        t = benchmarks.timed_back_to_back(lambda: fn(*inputs))["median_s"]
        print(f"| {name} | {knobs} | {1e3 * t:.3f} ms | max diff {err:.1e} |",
              flush=True)


if __name__ == "__main__":
  main()
