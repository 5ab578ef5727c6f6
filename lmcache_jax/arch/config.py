"""Architecture hyper-parameters of a Llama-family decoder."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and constants of a Llama / Mistral / Qwen2 decoder.

  Frozen and hashable, so it can be a static argument of jitted functions.
  """

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_context: int
  rope_theta: float = 10000.0
  # Llama-3 style frequency scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position); None = plain RoPE.
  rope_scaling: tuple[float, float, float, int] | None = None
  # Linear position interpolation factor (1.0 = none).
  rope_linear_factor: float = 1.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size",
                  "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "max_context"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def group_size(self) -> int:
    """Query heads that share one kv head."""
    return self.num_heads // self.num_kv_heads

  def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers, unquantized."""
    return (2 * self.num_layers * self.num_kv_heads * self.head_dim
            * bytes_per_element)
