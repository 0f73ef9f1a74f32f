"""Registry of compressed module classes, keyed by the ``kind`` of their scheme spec.

Every compressed module class has a ``kind`` (its :mod:`llmcomp.scheme` spec kind), implements
``spec() -> ModuleSpec`` (stored in config.json) and ``from_spec(spec, dtype)`` (an empty module
with the right buffer shapes, filled by ``load_state_dict``). Loaders never look at class names,
only at this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmcomp.errors import CheckpointError
from llmcomp.scheme import ModuleSpec, parse_module_spec

_MODULE_TYPES: dict[str, type[nn.Module]] = {}
DENSE_KIND = "dense"  # an ordinary nn.Linear (possibly pruned in place)


def register_module(kind: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if kind in _MODULE_TYPES:
            raise ValueError(f"module kind {kind!r} is already registered by {_MODULE_TYPES[kind]}")
        cls.kind = kind  # type: ignore[attr-defined]
        _MODULE_TYPES[kind] = cls
        return cls

    return decorator


def module_types() -> dict[str, type[nn.Module]]:
    _load_builtin_modules()
    return dict(_MODULE_TYPES)


def module_kind(module: nn.Module) -> str | None:
    """What a module is for the passes: ``dense`` (a linear layer), a compressed kind, or None
    (not a compressible module: norms, embeddings, containers)."""
    kind = getattr(type(module), "kind", None)
    if isinstance(kind, str) and kind in _MODULE_TYPES:
        return kind
    if isinstance(module, nn.Linear):
        return DENSE_KIND
    return None


def build_module(name: str, spec: ModuleSpec | dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An empty compressed module for ``spec``; raises a one-line error naming the module."""
    if not isinstance(spec, ModuleSpec):
        spec = parse_module_spec(name, spec)
    types = module_types()
    if spec.kind not in types:
        raise CheckpointError(
            f"config.json: module {name!r} has kind {spec.kind!r}, which no module class implements "
            f"(known: {', '.join(sorted(types))})"
        )
    try:
        return types[spec.kind].from_spec(spec, dtype)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: sizes overflowing int64
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"config.json: module {name!r} has an invalid spec ({detail})") from exc


def _load_builtin_modules() -> None:
    import llmcomp.modules  # noqa: F401  (importing the package registers the built-in modules)
