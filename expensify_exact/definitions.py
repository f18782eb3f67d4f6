"""The code location: everything under `expensify_exact/defs/` (assets, checks, jobs, schedules, sensors, resources)."""

from pathlib import Path

import dagster as dg


def build_defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent / "defs")


defs = build_defs()
