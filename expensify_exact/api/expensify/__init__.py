"""Expensify Integration Server: the client and the FreeMarker templates it sends."""

from expensify_exact.api.expensify.client import (
    ExpensifyClient,
    ExportWindow,
    PolicyCategory,
    PolicyInfo,
    PolicyTag,
    PolicyTaxRate,
    export_windows,
)

__all__ = [
    "ExpensifyClient",
    "ExportWindow",
    "PolicyCategory",
    "PolicyInfo",
    "PolicyTag",
    "PolicyTaxRate",
    "export_windows",
]
