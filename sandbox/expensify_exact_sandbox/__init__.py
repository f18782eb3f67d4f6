"""Local simulators of the Expensify Integration Server and Exact Online, quirks included."""
