"""``fastssl.kernels`` for a source checkout imported without ``pip install``.

The Triton kernels live in the checkout's top-level ``kernels/`` and ship as ``fastssl.kernels``
(pyproject's ``package-dir``): a wheel has ``fastssl/kernels/``, an editable install maps the name
to its checkout's ``kernels/``. With ``PYTHONPATH=checkout`` neither exists, so :func:`install`
maps ``fastssl.kernels`` to the ``kernels/`` beside the imported ``fastssl/`` — the directory an
editable install of that checkout would map — ahead of any other finder, so that a second
checkout (a git worktree) never runs the kernels of the one that was installed. Where there is
no such ``kernels/`` (a copied ``fastssl/`` alone) nothing is mapped and the Triton backend
reports the failed import as its reason (``registry.unavailable_reasons``).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACKAGE = "fastssl.kernels"


class CheckoutKernelsFinder:
    """A meta-path finder of ``fastssl.kernels`` (and its modules) in ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname == PACKAGE:
            return importlib.util.spec_from_file_location(
                fullname, self.directory / "__init__.py", submodule_search_locations=[str(self.directory)])
        if fullname.startswith(PACKAGE + "."):
            return importlib.machinery.PathFinder.find_spec(fullname, [str(self.directory)])
        return None


def install(package_dir: Path) -> None:
    """Map ``fastssl.kernels`` to ``package_dir/../kernels`` when ``package_dir`` (the imported
    ``fastssl/``) has no ``kernels/`` of its own and the checkout has one; once per process."""
    directory = package_dir.parent / "kernels"
    if (package_dir / "kernels").is_dir() or not (directory / "__init__.py").is_file():
        return
    if not any(isinstance(finder, CheckoutKernelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, CheckoutKernelsFinder(directory))
