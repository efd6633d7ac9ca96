"""Name -> factory registries (models, losses, evaluators) whose errors list the valid names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
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

  def parameters(self, name: str, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword parameter -> default (`inspect.Parameter.empty` if it has none) of entry `name`."""
    params = inspect.signature(self.get(name)).parameters
    return {key: p.default for key, p in params.items()
            if key not in exclude and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

  def check_keys(self, name: str, keys: Iterable[str], *, key_prefix: str, exclude: tuple[str, ...] = (),
                 owner_hint: str = "") -> None:
    """Raises a one-line InputError naming `key_prefix.key` for a key that entry `name` does not take.

    The error lists the valid keys (its parameters less `exclude`) and, for a parameter of other entries
    (a config written for another one), those entries and then `owner_hint`.
    """
    fn = self.get(name)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
      return
    valid = sorted(self.parameters(name, exclude=exclude))
    unknown = sorted(set(keys) - set(valid))
    if unknown:
      key = unknown[0]
      owners = [other for other in self.names() if other != name and key in self.parameters(other)]
      belongs = f"; it is a parameter of {self.kind} {owners}{owner_hint}" if owners else ""
      raise InputError(f"{key_prefix}.{key}: not a parameter of {self.kind} {name!r} (valid: {valid})"
                       f"{belongs}")

  def build(self, name: str, config_kwargs: Mapping[str, Any], *, key_prefix: str, **fixed: Any) -> Any:
    """Calls entry `name` with keyword arguments from a config; unknown keys name `key_prefix.key`."""
    self.check_keys(name, config_kwargs, key_prefix=key_prefix, exclude=tuple(fixed))
    return self.get(name)(**fixed, **dict(config_kwargs))
