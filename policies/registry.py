"""Named registries of policy factories: register, build by name, list.

A factory is usually a frozen dataclass; its fields are the policy's
parameters. ``make("snapkv(window=32)", budget=256)`` parses the call string,
merges keyword overrides (from flags and config files) and validates every
name against the factory's signature, so a typo is an error, not a default.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from typing import Any, Callable


class Registry:
  """Factories of one kind: eviction or calibration policies, replacement
  rules, or tasks."""

  def __init__(self, kind: str, package: str, noun: str = "policy"):
    self.kind = kind
    self.noun = noun
    self._package = package
    self._factories: dict[str, Callable[..., Any]] = {}
    self._loaded = False

  def register(self, name: str):
    """Class/function decorator adding a factory under ``name``."""
    def decorator(factory):
      if name in self._factories and self._factories[name] is not factory:
        raise ValueError(f"{self.kind} {self.noun} {name!r} is already registered "
                         f"by {self._factories[name].__module__}")
      self._factories[name] = factory
      return factory
    return decorator

  def _load(self) -> None:
    """Imports every module of the package, which registers its policies."""
    if self._loaded:
      return
    package = importlib.import_module(self._package)
    for module in pkgutil.iter_modules(package.__path__):
      importlib.import_module(f"{self._package}.{module.name}")
    self._loaded = True

  def names(self) -> list[str]:
    self._load()
    return sorted(self._factories)

  def get(self, name: str) -> Callable[..., Any]:
    self._load()
    if name not in self._factories:
      raise ValueError(f"unknown {self.kind} {self.noun} {name!r}; "
                       f"valid: {', '.join(self.names())}")
    return self._factories[name]

  def parameters(self, name: str) -> dict[str, Any]:
    """Parameter name -> default (``inspect.Parameter.empty`` if required)."""
    signature = inspect.signature(self.get(name))
    return {p.name: p.default for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

  def make(self, spec: str, **overrides) -> Any:
    """Builds a policy from ``"name"`` or ``"name(key=value, ...)"`` plus overrides.

    Overrides whose value is None are ignored, so unset flags keep defaults.
    A parameter given both in ``spec`` and as an override must have the same
    value in both: two different values are an error naming both.
    """
    name, kwargs = parse_spec(spec)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in sorted(set(kwargs) & set(overrides)):
      if kwargs[key] != overrides[key]:
        raise ValueError(f"{spec!r} sets {key}={kwargs[key]!r}, and "
                         f"{key}={overrides[key]!r} is also given; give one")
    kwargs.update(overrides)
    valid = self.parameters(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
      raise ValueError(f"{self.kind} {self.noun} {name!r} has no parameter(s) "
                       f"{', '.join(unknown)}; valid: {', '.join(valid) or 'none'}")
    return self.get(name)(**kwargs)

  def describe(self, with_parameters: bool = True) -> str:
    """One block per entry: name, first docstring line, parameters and defaults."""
    lines = []
    for name in self.names():
      factory = self._factories[name]
      doc = (inspect.getdoc(factory) or "").splitlines()
      lines.append(f"{name}: {doc[0] if doc else ''}")
      if not with_parameters:
        continue
      for param, default in self.parameters(name).items():
        shown = "required" if default is inspect.Parameter.empty else repr(default)
        lines.append(f"    {param} = {shown}")
    return "\n".join(lines)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """``"snapkv(window=32, pool='max')"`` -> ("snapkv", {"window": 32, "pool": "max"})."""
  spec = spec.strip()
  if "(" not in spec:
    if not spec.replace("_", "").replace("-", "").isalnum():
      raise ValueError(f"bad policy name {spec!r}")
    return spec, {}
  try:
    call = ast.parse(spec, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse policy spec {spec!r}: {e.msg}") from None
  if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
    raise ValueError(f"policy spec {spec!r} must look like name(key=value, ...)")
  kwargs = {}
  for keyword in call.keywords:
    try:
      kwargs[keyword.arg] = ast.literal_eval(keyword.value)
    except ValueError:
      raise ValueError(f"in policy spec {spec!r}, the value of "
                       f"{keyword.arg!r} is not a literal") from None
  return call.func.id, kwargs


EVICTION = Registry("eviction", "policies.eviction")
CALIBRATION = Registry("calibration", "policies.calibration")
REPLACEMENT = Registry("replacement", "policies.replacement", noun="rule")
