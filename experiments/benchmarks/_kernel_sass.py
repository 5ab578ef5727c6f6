"""Static SASS of the fused decode-attention kernel, without a GPU:

  pip install triton   # its compiler, ptxas and nvdisasm
  PYTHONPATH=. python3 experiments/benchmarks/_kernel_sass.py \
      [--format=int4] [--group=128] [--block=128] [--warps=2] [--stages=3]

Pallas lowers the kernel to a Triton module on any host (for compute
capability 9.0 when no GPU is present); this script captures that module,
compiles it for sm_90 with the installed ``triton`` package, and prints the
registers per thread and the opcode counts of the block loop (the body of
the largest backward branch). Shapes as the kernel suite: 4 query heads per
kv head, head dim 128, a 512-slot split.

The counts are static and indicative only: the GPU's XLA bundles its own
Triton, whose code differs (at 1cb1e4a, default tiling: 208 registers here
against 168 on the H200; block 64 on one warp spills here, not there). What
carries over is the kind of code: both show about one register move per
unpacked pair of codes (docs/benchmarks.md). Timings only come from the card
(``_kernel_ab.py``).
"""
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import lowering

from experiments import benchmarks
from lmcache_jax.kernels import decode_attention as da
from lmcache_jax.numerics.formats import get_format

HEADS, HEAD_DIM, SPLIT = 4, 128, 512


def triton_module(fmt, group: int, block: int, warps: int,
                  stages: int) -> str:
  """Text of the Triton module Pallas builds for one kernel configuration."""
  captured = []
  build_module = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = build_module(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  sds = jax.ShapeDtypeStruct
  lane = da.lane_bits(fmt, HEAD_DIM)
  width = fmt.words(HEAD_DIM) * 32 // lane
  groups = HEAD_DIM // group
  packed = [sds((1, 1, SPLIT, width), jnp.uint16 if lane == 16 else jnp.uint8),
            sds((1, 1, SPLIT, groups), jnp.float16),
            sds((1, 1, SPLIT, groups), jnp.uint8)]
  kernel = da._build(1, 1, groups * HEADS, HEADS, HEADS, HEADS, SPLIT,
                     HEAD_DIM, width, fmt, group, block, SPLIT, warps, stages,
                     False)
  check = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  lowering.lower_jaxpr_to_triton_module = capture
  try:
    export.export(jax.jit(kernel), platforms=["cuda"], disabled_checks=check)(
        sds((1, 1, groups * HEADS, HEAD_DIM * len(fmt.planes)), jnp.bfloat16),
        sds((1, 1), jnp.int32), sds((1, 1, SPLIT), jnp.int32),
        *packed, *packed)
  finally:
    lowering.lower_jaxpr_to_triton_module = build_module
  return captured[0]


def sass(module: str, warps: int, stages: int) -> tuple[str, str]:
  """(resource usage line, disassembly) of the module compiled for sm_90."""
  import triton
  from triton.backends.compiler import GPUTarget
  tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
  with tempfile.TemporaryDirectory() as tmp:
    source = Path(tmp) / "kernel.ttir"
    source.write_text(module)
    compiled = triton.compile(str(source), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps,
                                           num_stages=stages))
    cubin = Path(tmp) / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin],
                           capture_output=True, text=True).stdout
    listing = subprocess.run([tools / "nvdisasm", "-c", cubin],
                             capture_output=True, text=True).stdout
  return next(l.strip() for l in usage.splitlines() if "REG:" in l), listing


def loop_opcodes(listing: str) -> collections.Counter:
  """Opcode counts (without modifiers) of the body of the largest loop."""
  code = []   # (address, instruction) with labels as None entries
  labels = {}
  for line in listing.splitlines():
    if re.match(r"\.L_x_\d+:", line):
      labels[line[:-1]] = len(code)
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
    if m:
      code.append(m.group(1))
  loop = (0, 0)
  for end, text in enumerate(code):
    target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
    start = labels.get(target.group(1), end) if target else end
    if start < end and end - start > loop[1] - loop[0]:
      loop = (start, end)
  counts = collections.Counter()
  for text in code[loop[0]:loop[1] + 1]:
    words = text.split()
    op = words[1] if words[0].startswith("@") else words[0]
    counts[op.split(".")[0]] += 1
  return counts


def main():
  fmt = get_format(benchmarks.flag("format", "int4"))
  default_block, default_warps = da.default_tiling(fmt)
  group = int(benchmarks.flag("group", str(HEAD_DIM)))
  block = int(benchmarks.flag("block", str(default_block)))
  warps = int(benchmarks.flag("warps", str(default_warps)))
  stages = int(benchmarks.flag("stages", "3"))
  usage, listing = sass(triton_module(fmt, group, block, warps, stages),
                        warps, stages)
  counts = loop_opcodes(listing)
  print(f"{fmt.name} group {group}, block {block}, {warps} warps, "
        f"{stages} stages: {usage}")
  print(f"loop body: {sum(counts.values())} instructions per warp and block")
  for op, n in counts.most_common(20):
    print(f"  {op:8s} {n}")


if __name__ == "__main__":
  main()
