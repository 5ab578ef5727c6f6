"""A quant plan: the storage format of every (layer, kv head), and its knobs.

Calibration policies produce plans; ``init_cache(..., quant=plan)`` allocates
the packed cache they describe. Plans are saved as JSON (formats by name)
beside an ``.npz`` of their arrays, so a calibration run's choice can be
reused (``--quant_plan=PATH``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import collections
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import tempfile

import numpy as np

from lmcache_jax.quant import transform
from lmcache_jax.numerics.formats import FORMATS, get_format

if TYPE_CHECKING:
  from lmcache_jax.arch.config import ModelConfig

# How keys are grouped: per token over channels, or per channel over slots.
KEY_LAYOUTS = ("token", "channel")

# A saved plan (``QuantPlan.save``): the record, with formats by name and the
# knobs below, and the arrays it names by digest.
PLAN_FILE = "quant_plan.json"
ARRAYS_FILE = "quant_plan.npz"
_KNOBS = ("group_size", "residual", "sinks", "policy", "rotate", "copy_bits",
          "outliers", "key_layout", "key_group")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantPlan:
  """Per-(layer, kv head) formats plus the cache-wide quantization knobs.

  The field defaults (and ``uniform``'s) make a bare plan: no token kept
  exact, no transform. The plan ``kv_bits`` alone builds, on the command
  line and in the Python API, takes its knobs from ``lmcache_jax.defaults``.

  formats:    [L][K] format names (``int2``, ``int3``, ``int4``, ``int8``, ``fp8``).
  key_scale:  [L, K, Hd] float32 divisors applied to keys before quantizing
              (and undone on read); equal on each RoPE pair (d, d + Hd/2), so
              dividing post-RoPE keys equals dividing them before RoPE.
              Ones = plain per-token quantization.
  group_size: channels sharing a scale and zero.
  residual:   most recent tokens also kept in full precision.
  sinks:      first tokens (positions) kept in full precision.
  policy:     the calibration that chose it, for reports.
  rotate:     head vectors rotated by a Hadamard matrix before quantizing
              (``quant.transform``), spreading outlier channels.
  key_shift:  [L, K, Hd] float32 calibrated mean of each key channel (after
              RoPE), subtracted before quantizing and added back on read, so
              the grid covers each key's deviation from the mean; None = 0.
  copy_bits:  how the sink and recent copies are held: 16 = in the cache's
              dtype, 8 = int8 codes of the stored (centered, rotated)
              vectors per ``group_size`` channels: half the bytes.
  outliers:   entries of largest magnitude per stored vector kept exact
              beside the int codes (KVQuant's dense-and-sparse; 3 bytes
              each). Decoding then reads the dequantized layer instead of
              the fused kernel (logged).
  key_layout: ``"token"`` (default): keys quantized per token over groups of
              ``group_size`` channels, like values. ``"channel"`` (KIVI):
              keys quantized per channel over groups of ``key_group`` slots,
              a float16 scale and float16 minimum per (group, channel); a
              group is quantized once all its slots hold a token (the exact
              window holds it until then), ``quant.payload`` has the rules.
              Values stay per token.
  key_group:  slots per key group under ``key_layout="channel"`` (KIVI's
              G); it must divide the cache capacity and fit in ``residual``.
  """
  formats: tuple[tuple[str, ...], ...]
  key_scale: np.ndarray
  group_size: int = 64
  residual: int = 0
  sinks: int = 0
  policy: str = ""
  rotate: bool = False
  key_shift: np.ndarray | None = None
  copy_bits: int = 16
  outliers: int = 0
  key_layout: str = "token"
  key_group: int = 32

  def __post_init__(self):
    for row in self.formats:
      for name in row:
        get_format(name)
    if len({len(row) for row in self.formats}) != 1:
      raise ValueError("every layer of a quant plan needs the same number of "
                       "kv heads")
    want = (len(self.formats), len(self.formats[0]))
    if self.key_scale.ndim != 3 or self.key_scale.shape[:2] != want:
      raise ValueError(f"key_scale must be [L, K, Hd] with (L, K) = {want}, "
                       f"got {self.key_scale.shape}")
    if not np.all(self.key_scale > 0):
      raise ValueError("key_scale must be positive")
    if self.key_shift is not None and self.key_shift.shape != self.key_scale.shape:
      raise ValueError(f"key_shift must be [L, K, Hd] = "
                       f"{self.key_scale.shape}, got {self.key_shift.shape}")
    if self.rotate:
      transform.check_dim(self.head_dim)
    for name in ("group_size", "residual", "sinks"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < (name == "group_size"):
        raise ValueError(f"QuantPlan.{name} must be a "
                         f"{'positive' if name == 'group_size' else 'non-negative'}"
                         f" int, got {value!r}")
    for name in self.distinct_formats():
      get_format(name).check(self.head_dim, self.group_size)
    if not (isinstance(self.outliers, (int, np.integer))
            and 0 <= self.outliers < self.head_dim
            and (self.outliers == 0 or self.head_dim <= 256)):
      raise ValueError(f"QuantPlan.outliers must be an int in [0, head_dim="
                       f"{self.head_dim}) (head_dim <= 256 for outliers: "
                       f"their channels are uint8), got {self.outliers!r}")
    if self.copy_bits not in (8, 16):
      raise ValueError(f"QuantPlan.copy_bits must be 8 (int8 copies) or 16 "
                       f"(the cache dtype), got {self.copy_bits!r}")
    self._check_key_layout()

  def _check_key_layout(self) -> None:
    """Per-channel keys: the knobs that must agree (one line each)."""
    if self.key_layout not in KEY_LAYOUTS:
      raise ValueError(f"QuantPlan.key_layout must be one of "
                       f"{', '.join(map(repr, KEY_LAYOUTS))}, got "
                       f"{self.key_layout!r}")
    if (isinstance(self.key_group, bool)
        or not isinstance(self.key_group, (int, np.integer))
        or self.key_group < 1):
      raise ValueError(f"QuantPlan.key_group must be a positive int (slots "
                       f"per per-channel key group), got {self.key_group!r}")
    if self.key_layout != "channel":
      return
    if self.residual < self.key_group:
      raise ValueError(
          f"key_layout='channel' holds a key group's tokens exact until all "
          f"{self.key_group} are written, so residual must be >= key_group="
          f"{self.key_group}; got residual={self.residual}")
    fp = sorted({f for f in self.distinct_formats()
                 if not get_format(f).has_zero})
    if fp:
      raise ValueError(f"key_layout='channel' needs int formats (a min/max "
                       f"grid per channel); got {', '.join(fp)}")
    if self.outliers:
      raise ValueError(f"key_layout='channel' keeps no outlier entries (its "
                       f"per-channel grids absorb outlier channels); got "
                       f"outliers={self.outliers}")

  @classmethod
  def uniform(cls, cfg: ModelConfig, fmt: str, *, group_size: int = 64,
              residual: int = 0, sinks: int = 0, key_scale=None,
              policy: str = "uniform", rotate: bool = False,
              key_shift=None, copy_bits: int = 16,
              outliers: int = 0, key_layout: str = "token",
              key_group: int = 32) -> "QuantPlan":
    formats = tuple((fmt,) * cfg.num_kv_heads for _ in range(cfg.num_layers))
    if key_scale is None:
      key_scale = np.ones((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
                          np.float32)
    return cls(formats, np.asarray(key_scale, np.float32), group_size,
               residual, sinks, policy, rotate,
               None if key_shift is None else np.asarray(key_shift, np.float32),
               copy_bits, outliers, key_layout, key_group)

  def replace(self, **changes) -> "QuantPlan":
    return dataclasses.replace(self, **changes)

  @property
  def num_layers(self) -> int:
    return len(self.formats)

  @property
  def num_kv_heads(self) -> int:
    return len(self.formats[0])

  @property
  def head_dim(self) -> int:
    return self.key_scale.shape[-1]

  def distinct_formats(self) -> list[str]:
    return sorted({f for row in self.formats for f in row},
                  key=lambda f: (FORMATS[f].bits, f))

  def average_bits(self) -> float:
    """Mean code bits per element over layers and heads (scales excluded)."""
    return float(np.mean([[FORMATS[f].bits for f in row]
                          for row in self.formats]))

  def check(self, cfg: ModelConfig) -> None:
    """Raises when the plan does not fit the model's shapes."""
    have = (self.num_layers, self.num_kv_heads, self.head_dim)
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if have != want:
      raise ValueError(
          f"quant plan has (layers, kv heads, head dim) = {have} but model "
          f"{cfg.name} has {want}")

  def describe(self) -> str:
    counts = collections.Counter(f for row in self.formats for f in row)
    per_layer = " ".join("/".join(f.removeprefix("int") for f in row)
                         for row in self.formats)
    scaled = bool(np.any(self.key_scale != 1))
    extras = "".join([", per-channel key scales" if scaled else "",
                      ", centered keys" if self.key_shift is not None else "",
                      ", Hadamard-rotated" if self.rotate else "",
                      ", int8 copies" if self.copy_bits == 8 else "",
                      f", {self.outliers} outliers per vector"
                      if self.outliers else "",
                      f", keys per channel over {self.key_group}-token "
                      f"groups" if self.key_layout == "channel" else ""])
    return (f"plan[{self.policy or 'custom'}] avg {self.average_bits():.2f} "
            f"bits; {dict(sorted(counts.items()))}; group {self.group_size}, "
            f"residual {self.residual}, sinks {self.sinks}{extras}\n"
            f"  per layer (heads): {per_layer}")

  def save(self, path, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the plan into directory ``path`` (created if missing) as
    ``quant_plan.json`` (formats by name, knobs) and ``quant_plan.npz`` (the
    key scales and shifts); returns ``path``. Nothing else there is touched:
    each file is written beside its final name and renamed over it. A plan
    already there is replaced only when ``overwrite``."""
    path = pathlib.Path(path).absolute()
    record = path / PLAN_FILE
    if path.exists() and not path.is_dir():
      raise ValueError(f"cannot save a quant plan into {path}: it is a file, "
                       f"not a directory")
    if record.exists() and not overwrite:
      raise ValueError(f"{record} already holds a quant plan; save to another "
                       f"directory, or pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"key_scale": self.key_scale.astype(np.float32)}
    if self.key_shift is not None:
      arrays["key_shift"] = self.key_shift.astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    fields = {"formats": [list(row) for row in self.formats],
              **{name: _plain(getattr(self, name)) for name in _KNOBS},
              "arrays_sha256": hashlib.sha256(blob).hexdigest()}
    _write_atomically(path / ARRAYS_FILE, blob)   # first: the record names it
    _write_atomically(record, (json.dumps(fields, indent=1) + "\n").encode())
    return path

  @classmethod
  def load(cls, path, cfg: ModelConfig | None = None) -> "QuantPlan":
    """Reads a plan saved by ``save``; checks it against ``cfg`` if given."""
    path = pathlib.Path(path).absolute()
    record = path / PLAN_FILE
    if not record.is_file():
      raise ValueError(f"no quant plan at {path} (expected {PLAN_FILE} written "
                       f"by QuantPlan.save)")
    try:
      fields = json.loads(record.read_text())
      blob = (path / ARRAYS_FILE).read_bytes()
    except (OSError, ValueError) as e:
      raise ValueError(f"quant plan {path} is unreadable: {e}") from None
    missing = sorted({"formats", "arrays_sha256", *_KNOBS} - set(fields))
    if missing:
      raise ValueError(f"quant plan {record} lacks {', '.join(missing)}")
    if hashlib.sha256(blob).hexdigest() != fields["arrays_sha256"]:
      raise ValueError(f"{path / ARRAYS_FILE} is not the one {record} was "
                       f"saved with (an interrupted save?); save the plan again")
    with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
      shift = arrays["key_shift"] if "key_shift" in arrays else None
      plan = cls(tuple(tuple(row) for row in fields["formats"]),
                 np.asarray(arrays["key_scale"], np.float32),
                 key_shift=shift, **{k: fields[k] for k in _KNOBS})
    if cfg is not None:
      plan.check(cfg)
    return plan


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to a new file beside ``path``, flushed to disk, and
  renames it over ``path``: a reader sees the old file or the new one. Only
  that new file is ever removed (when the write fails)."""
  fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                              suffix=".tmp")
  temp = pathlib.Path(name)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    temp.unlink(missing_ok=True)
    raise
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(directory)   # the rename itself survives a crash
  finally:
    os.close(directory)


def _plain(value):
  """A numpy scalar as the Python value JSON writes."""
  return value.item() if isinstance(value, np.generic) else value
