"""Importing lightly beside the CPU torch: its loss modules import torchvision at import time, which
is never installed here (it breaks the CPU torch), so a stub stands in for it. Standard library only:
``bench.startup``'s subprocesses import this before torch and the library they measure."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and its submodules as empty modules whose every attribute is a
    placeholder class (lightly imports and subclasses some at import time, calls none)."""

    class Module(types.ModuleType):
        def __getattr__(self, attribute: str):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            return type(attribute, (), {})

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = self.Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def prepare_lightly_import(lightly_path: str = "") -> None:
    """Put ``lightly_path`` (if any) first on the import path and, where torchvision is not
    installed (never beside the CPU torch here: it breaks it), the torchvision stub."""
    if lightly_path:
        sys.path.insert(0, lightly_path)
    if importlib.util.find_spec("torchvision") is None and not any(
            isinstance(finder, _TorchvisionStub) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionStub())
