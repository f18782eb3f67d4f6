"""The code location: every module under `expensify_exact/defs/` contributes `build(config)` for the mappings."""

import importlib
import os
import pkgutil

import dagster as dg

from expensify_exact import defs as defs_package
from expensify_exact.config import load_project_config

MAPPINGS_ENV = "EXPENSIFY_EXACT_MAPPINGS"


def build_defs(mappings_dir: str | None = None) -> dg.Definitions:
    """Assets, checks, jobs, schedules, sensors and resources for the connections in `mappings_dir`.

    Args:
        mappings_dir: the mappings folder; default `$EXPENSIFY_EXACT_MAPPINGS`, else `./mappings`.
    """
    config = load_project_config(mappings_dir or os.environ.get(MAPPINGS_ENV, "mappings"))
    parts = []
    for info in sorted(pkgutil.iter_modules(defs_package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{defs_package.__name__}.{info.name}")
        if hasattr(module, "build"):
            parts.append(module.build(config))
    return dg.Definitions.merge(*parts)


@dg.definitions
def defs() -> dg.Definitions:
    # Loaded lazily, so importing this module never reads mappings/; a config error shows in the UI at load.
    return build_defs()
