"""Keep dimshard's top-level folders from shadowing installed packages of the same name.

The repository root is the ``dimshard`` package (``planner/`` is ``dimshard.planner``, and so on),
so whenever the root itself is on ``sys.path`` (``python -c``, ``python -m pytest``, a notebook
opened there: Python puts the working directory first) ``import kernels`` would find our folder
before the ``kernels`` distribution that transformers imports. Each package folder's
``__init__`` calls :func:`step_aside` when it is being imported under its bare name; that import
then resolves as if the folder held no package. See docs/design.md, "Import names".
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types


def step_aside(name: str, folder: str) -> None:
    """Finish ``import <name>`` as if the repository root were not on ``sys.path``.

    ``folder`` is the package folder being imported under the bare ``name``. On return
    ``sys.modules[name]`` is the installed distribution's module if there is one; otherwise it is
    what Python makes of a plain folder of that name, an empty namespace package (no ``__file__``,
    nothing importable beneath), which is also what transformers' package probes read as absent.
    """
    root = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.realpath(os.path.abspath(p or os.curdir)) != root]
    sys.modules.pop(name, None)
    try:
        importlib.import_module(name)
        return
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    finally:
        sys.path[:] = saved
    empty = types.ModuleType(name, f"dimshard's {name}/ folder seen from the repository root: "
                                   f"import it as dimshard.{name}")
    empty.__path__ = []
    empty.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = empty
