"""Name -> factory registries (models, losses, evaluators) whose errors list the valid names."""

from __future__ import annotations

from collections.abc import Callable
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
