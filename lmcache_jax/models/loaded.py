"""A model split for the jitted steps, with its config and tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from lmcache_jax.arch.config import ModelConfig
from lmcache_jax.models.llama import Transformer


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """The model as the engine uses it: a static graph plus parameters.

  Splitting once here keeps module objects out of the jitted steps.
  """
  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  dtype: Any
  tokenizer: Any = None
  source: str = ""

  @classmethod
  def from_module(cls, model: Transformer, tokenizer=None,
                  source: str = "") -> "LoadedModel":
    graphdef, params = nnx.split(model)
    return cls(model.cfg, graphdef, params, model.dtype, tokenizer, source)
