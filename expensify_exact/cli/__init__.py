"""`expensify-exact`, the operator's command line: `main` builds the parser, each command lives in `commands/` over
the shared `support` module."""
