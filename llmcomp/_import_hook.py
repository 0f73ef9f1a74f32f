"""Run a callback right after a given module is imported, without importing it ourselves.

``import llmcomp`` must register the checkpoint format with transformers, but importing
``transformers.quantizers.auto`` costs seconds (it imports every quantizer). Deferring the
registration to the moment transformers itself loads that module keeps ``llmcomp --help`` fast
while ``AutoModelForCausalLM.from_pretrained`` still sees the format.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, callback: Callable[[], None]) -> None:
        self.target = target
        self.callback = callback

    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids finding ourselves below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module
        callback = self.callback

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            callback()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def call_after_import(module_name: str, callback: Callable[[], None]) -> None:
    """``callback()`` now if ``module_name`` is already imported, else right after it is."""
    if module_name in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _AfterImport(module_name, callback))
