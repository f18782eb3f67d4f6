"""CLI command groups beyond the core ones in cli.py: each module here exposes `register(subparsers)`."""
