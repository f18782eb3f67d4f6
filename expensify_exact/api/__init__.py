"""The API clients: paced, redacting HTTP (`http/`), Exact Online (`exact/`), Expensify (`expensify/`), and how one
connection's clients are built from its settings and the vault (`connections`). No accounting rules, no Dagster."""
