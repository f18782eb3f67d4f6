"""Reads Exact's dimension tables (accounts, cost centers, cost units, journals, VAT codes, periods) into DataFrames."""

from __future__ import annotations

from typing import Protocol

import pandas as pd

from expensify_exact.transform.journal import Dimensions


class DimensionReader(Protocol):
    def get_all(self, path: str, select, filter: str | None = None, orderby: str | None = None) -> list[dict]: ...


# name -> (endpoint, {Exact field: our column}); $select is always explicit (exact-online.md §4.6).
# financial/GLAccounts has a sync twin, so it refuses a read without a filter on ID or Code (mandatory filtering,
# §4.6/§13); the whole table is read from the twin, from the first row version on.
DIMENSION_QUERIES: dict[str, tuple[str, dict[str, str]]] = {
    "gl_accounts": ("sync/Financial/GLAccounts", {
        "ID": "id", "Code": "code", "Description": "description", "Type": "type", "IsBlocked": "is_blocked",
        "UseCostcenter": "use_costcenter", "UseCostunit": "use_costunit"}),
    "cost_centers": ("hrm/Costcenters", {"ID": "id", "Code": "code", "Description": "description",
                                         "EndDate": "end_date"}),
    "cost_units": ("hrm/Costunits", {"ID": "id", "Code": "code", "Description": "description",
                                     "EndDate": "end_date"}),
    "journals": ("financial/Journals", {
        "ID": "id", "Code": "code", "Description": "description", "Type": "type", "AllowVAT": "allow_vat",
        "AllowVariableCurrency": "allow_variable_currency", "IsBlocked": "is_blocked"}),
    "vat_codes": ("vat/VATCodes", {"ID": "id", "Code": "code", "Description": "description", "Type": "type",
                                   "Percentage": "percentage", "IsBlocked": "is_blocked"}),
    "financial_periods": ("financial/FinancialPeriods", {
        "ID": "id", "FinYear": "fin_year", "FinPeriod": "fin_period", "StartDate": "start_date",
        "EndDate": "end_date"}),
}


DIMENSION_FILTERS: dict[str, str] = {"gl_accounts": "Timestamp gt 1L"}


def fetch_dimension(client: DimensionReader, name: str) -> pd.DataFrame:
    path, fields = DIMENSION_QUERIES[name]
    records = client.get_all(path, select=list(fields), filter=DIMENSION_FILTERS.get(name))
    frame = pd.DataFrame(records, columns=list(fields)).rename(columns=fields)
    for column in ("start_date", "end_date"):
        if column in frame:
            # Exact's dates are Amsterdam wall-clock (exact-online.md §4.5): keep the calendar day.
            frame[column] = frame[column].map(lambda v: v.date() if hasattr(v, "date") and v is not None
                                              and not pd.isna(v) else None)
    return frame


def fetch_dimensions(client: DimensionReader) -> Dimensions:
    return Dimensions(**{name: fetch_dimension(client, name) for name in DIMENSION_QUERIES})
