"""Name -> factory registries (models, losses, evaluators) whose errors list the valid names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from wikitopics_jax.errors import InputError


class Registry:

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str):
    def decorator(fn):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = fn
      return fn
    return decorator

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._entries:
      raise InputError(f"unknown {self.kind} {name!r}; valid names: {sorted(self._entries)}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def build(self, name: str, config_kwargs: Mapping[str, Any], *, key_prefix: str, **fixed: Any) -> Any:
    """Calls entry `name` with keyword arguments from a config; unknown keys name `key_prefix.key`."""
    fn = self.get(name)
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
      unknown = sorted(set(config_kwargs) - (set(params) - set(fixed)))
      if unknown:
        valid = sorted(set(params) - set(fixed))
        raise InputError(f"{key_prefix}.{unknown[0]}: not a parameter of {self.kind} {name!r} "
                         f"(valid: {valid})")
    return fn(**fixed, **dict(config_kwargs))
