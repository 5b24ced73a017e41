"""Search spaces -> Ray Tune + Optuna (``space``, ``search``, ``objective``, ``objectives``).

This package is also the function ``tuneguard.tune(space, ...)`` of the Python API
(:func:`tuneguard.api.tune`): once any ``tuneguard.tune.*`` module is imported, Python binds the
name ``tuneguard.tune`` to this package, so the package itself is made callable (its module
class gets a ``__call__``) rather than having the function and the package fight over one name.
Nothing heavy is imported here.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tuneguard.api import tune

        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
