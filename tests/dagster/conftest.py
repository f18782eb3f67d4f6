"""Fixtures shared by the Dagster tests: a throwaway Dagster instance per test."""

from __future__ import annotations

import dagster as dg
import pytest


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield instance
