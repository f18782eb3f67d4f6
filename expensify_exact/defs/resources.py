"""The resources every asset, sensor and job of the connector shares."""

import dagster as dg

from expensify_exact.config import ProjectConfig
from expensify_exact.io_manager import PerDayPickleIOManager
from expensify_exact.resources import ConnectorResource


def build(config: ProjectConfig) -> dg.Definitions:
    # The state URL is read from $EXPENSIFY_EXACT_STATE_URL at run time (default: SQLite under $DAGSTER_HOME).
    return dg.Definitions(resources={"connector": ConnectorResource(mappings_dir=config.source_dir),
                                     "io_manager": PerDayPickleIOManager()})
