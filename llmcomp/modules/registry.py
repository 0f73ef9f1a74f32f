"""Registry of compressed module types, keyed by the ``type`` field of a module spec.

Every compressed module class implements ``spec() -> dict`` (stored in config.json) and
``from_spec(spec, dtype)`` (an empty module with the right buffer shapes, filled by
``load_state_dict``). Loaders never look at class names, only at this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmcomp.errors import CheckpointError

_MODULE_TYPES: dict[str, type[nn.Module]] = {}


def register_module(type_name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if type_name in _MODULE_TYPES:
            raise ValueError(f"module type {type_name!r} is already registered by {_MODULE_TYPES[type_name]}")
        _MODULE_TYPES[type_name] = cls
        return cls

    return decorator


def module_types() -> dict[str, type[nn.Module]]:
    _load_builtin_modules()
    return dict(_MODULE_TYPES)


def build_module(name: str, spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An empty compressed module for ``spec``; raises a one-line error naming the module."""
    types = module_types()
    type_name = spec.get("type")
    if type_name not in types:
        raise CheckpointError(
            f"config.json: module {name!r} has unknown type {type_name!r}; known: {', '.join(sorted(types))}"
        )
    try:
        return types[type_name].from_spec(spec, dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: module {name!r} has an invalid spec ({exc})") from exc


def _load_builtin_modules() -> None:
    import llmcomp.modules  # noqa: F401  (importing the package registers the built-in modules)
