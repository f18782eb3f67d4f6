"""The resources every asset, sensor and job of the connector shares."""

import dagster as dg

from expensify_exact.io_manager import PerDayPickleIOManager
from expensify_exact.resources import default_connector


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"connector": default_connector(), "io_manager": PerDayPickleIOManager()})
