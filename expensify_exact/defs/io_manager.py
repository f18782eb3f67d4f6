"""Pickle storage per asset and day that also accepts a single run writing many days (single-run backfills)."""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager


class _PerDayPickleIOManager(PickledObjectFilesystemIOManager):
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not context.has_asset_partitions or len(context.asset_partition_keys) == 1:
            return super().handle_output(context, obj)
        # A run over several days hands us {day: value}; each day keeps its own file, as if run alone.
        paths = self._get_paths_for_partitions(context)
        if not isinstance(obj, dict) or set(obj) != set(paths):
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__} for "
                f"{len(paths)} partitions; expected a dict keyed by partition")
        for key, path in paths.items():
            self.make_directory(path.parent)
            self.dump_to_path(context=context, obj=obj[key], path=path)
        context.add_output_metadata({"partitions_written": len(paths)})


class PerDayPickleIOManager(dg.ConfigurableIOManagerFactory):
    """Stores each asset's value per partition under `base_dir` (default: the instance's storage directory)."""

    base_dir: str | None = None

    def create_io_manager(self, context: dg.InitResourceContext) -> _PerDayPickleIOManager:
        return _PerDayPickleIOManager(base_dir=self.base_dir or context.instance.storage_directory())
