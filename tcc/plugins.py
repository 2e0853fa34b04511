"""Entry-point plugins, loaded the same way by every registry (passes: tcc.pipeline, backends:
tcc.pipeline.backend, frontends: tcc.frontends.registry). A plugin that fails to load is skipped
with a PluginWarning naming it: a broken plugin must not break tcc. Imports only the standard library.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any, Callable


class PluginWarning(UserWarning):
    """A third-party plugin (pass, backend, frontend) could not be loaded and was skipped."""


def load_entry_points(group: str, what: str, use: Callable[[Any], None],
                      skip: Callable[[str], bool] = lambda name: False) -> None:
    """For each entry point of `group` whose name `skip` does not refuse: `use(the loaded object)`;
    an exception from either is a PluginWarning "tcc: skipping `what` plugin 'name' (value): ..."."""
    for ep in importlib.metadata.entry_points(group=group):
        if skip(ep.name):
            continue
        try:
            use(ep.load())
        except Exception as e:  # a broken plugin must not break tcc
            warnings.warn(f"tcc: skipping {what} plugin '{ep.name}' ({ep.value}): {type(e).__name__}: {e}",
                          PluginWarning, stacklevel=3)


def instance(obj):
    """An entry point's object, or an instance of it when it is a class."""
    return obj() if isinstance(obj, type) else obj
