"""Keep dimshard's top-level folders from shadowing installed packages of the same name.

The repository root is the ``dimshard`` package (``planner/`` is ``dimshard.planner``, and so on),
so whenever the root itself is on ``sys.path`` (``python -c``, ``python -m pytest``, a notebook
opened there: Python puts the working directory first) ``import kernels`` would find our folder
before the ``kernels`` distribution that transformers imports. Each package folder's
``__init__`` calls :func:`step_aside` when it is being imported under its bare name; that import
then resolves as if the folder were not there. See docs/design.md, "Import names".
"""

from __future__ import annotations

import importlib
import os
import sys


def step_aside(name: str, folder: str) -> None:
    """Finish ``import <name>`` as if the repository root were not on ``sys.path``.

    ``folder`` is the package folder being imported under the bare ``name``. On return
    ``sys.modules[name]`` is the installed distribution's module; if no other ``name`` exists,
    ``ModuleNotFoundError`` is raised, exactly as without our folder.
    """
    root = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.realpath(os.path.abspath(p or os.curdir)) != root]
    ours = sys.modules.pop(name, None)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {os.path.join(root, name)} is dimshard's: "
            f"import it as dimshard.{name})", name=name) from None
    except BaseException:
        if ours is not None and name not in sys.modules:
            sys.modules[name] = ours
        raise
    finally:
        sys.path[:] = saved
