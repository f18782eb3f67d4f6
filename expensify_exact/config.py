"""The one config schema for `mappings/`: pydantic models, loaded once and validated fully, errors at file:line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from expensify_exact.errors import ConfigError

EXPENSIFY_ENDPOINT = "https://integrations.expensify.com/Integration-Server/ExpensifyIntegrations"
CONNECTIONS_FILE = "connections.yaml"
CATEGORIES_FILE = "categories.yaml"
TAGS_FILE = "tags.yaml"
VAT_FILE = "vat.yaml"
DEFAULTS_FILE = "defaults.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpensifySettings(_Strict):
    policy_ids: list[str] = Field(min_length=1)
    endpoint_url: str = EXPENSIFY_ENDPOINT  # only the sandbox and tests change this
    card_domain: str | None = None  # the domain whose company cards feed unreported-spend reporting
    # Expensify prints report timestamps without a zone; the sheet does not say which (expensify.md §3 [INF]).
    timestamp_timezone: str = "UTC"
    poll_interval_seconds: float = Field(5.0, gt=0)
    poll_timeout_seconds: float = Field(300.0, gt=0)
    mark_exported_label: str | None = None  # off by default: Expensify labels at export time (expensify.md §2.2)
    # Connections naming the same credential share one Expensify partner login: its secrets are kept once under
    # this name, and their policies are exported together, one export job a day (Expensify's limits are per
    # credential). Default: the connection's own name, i.e. a login of its own.
    credential: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")

    @field_validator("timestamp_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        return _check_timezone(value)


ExactRegion = Literal["netherlands", "belgium", "united_kingdom", "germany", "france", "spain", "usa"]


class ExactSettings(_Strict):
    region: ExactRegion = "netherlands"
    division: int = Field(gt=0)
    base_url: str | None = None  # overrides the region's host; only the sandbox and tests set it
    redirect_uri: str | None = None  # as registered in Exact's App Center; needed by `expensify-exact authorize`
    journal: str = Field(min_length=1, description="code of a type-90 general journal")
    employee_payable_account: str = Field(min_length=1)
    card_liability_account: str = Field(min_length=1, description="default credit account for company-card spend")
    card_accounts: dict[str, str] = Field(default_factory=dict, description="card feed (bank) or card ID -> account")
    rounding_account: str | None = None
    division_currency: str = "EUR"


class PostingRules(_Strict):
    """How reports become entries. Every key has a default; see the README's mappings reference.

    - `fallback_to_category_gl_code`: a category without a row in categories.yaml posts to the GL code set on
      the category in Expensify's policy (if any) instead of being quarantined as UNMAPPED_CATEGORY.
    - `exchange_rates`: report currency -> division-currency units per one unit of it (the direction of
      Expensify's own rates: `converted = amount x rate`). Used only for a report in a foreign currency on a
      journal that does not allow variable currency; such a report without a rate is quarantined as
      MISSING_EXCHANGE_RATE. On a journal that allows variable currency the entry is posted in the report
      currency with no `ExchangeRate`, so Exact applies its own rate table.
    - `grace_hours`, `lookback_days`: a day is posted once it has ended in the connection's timezone plus the
      grace; that run re-exports the `lookback_days` days before it too, so an approval that reached Expensify's
      export late is still posted (and audited as `late_approval`).
    - `require_vat`: when true, an expense whose tax name maps to a VAT code, posted on a journal that does not
      allow VAT, quarantines the report (VAT_NOT_ALLOWED) instead of posting the gross amount without a code.
    """

    date_policy: Literal["approval_date", "submitted_date", "last_expense_date", "reimbursed_date", "run_date"] = "approval_date"
    closed_period_policy: Literal["quarantine", "next_open_period"] = "quarantine"
    closed_through: str | None = Field(None, description="YYYY-MM: periods up to and including this one are closed")
    fallback_to_category_gl_code: bool = False
    exchange_rates: dict[str, float] = Field(default_factory=dict,
                                             description="report currency -> division currency per unit")
    require_vat: bool = False
    grace_hours: float = Field(1.0, ge=0, le=24,
                               description="a day is posted this long after it ended in the connection's timezone")
    lookback_days: int = Field(3, ge=0, le=31,
                               description="each day's run re-exports this many earlier days for late approvals")

    @field_validator("exchange_rates")
    @classmethod
    def _positive_rates(cls, value: dict[str, float]) -> dict[str, float]:
        for currency, rate in value.items():
            if not re.fullmatch(r"[A-Z]{3}", str(currency)):
                raise ValueError(f"{currency!r} is not an ISO 4217 currency code")
            if not rate > 0:
                raise ValueError(f"the rate for {currency} must be positive, got {rate}")
        return value

    @field_validator("closed_through")
    @classmethod
    def _year_month(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", value):
            raise ValueError("must look like 2025-12")
        return value


class SmtpSettings(_Strict):
    """The mail server the digest and alerts go out through; its login is in the vault (`smtp_username`,
    `smtp_password`), never in the YAML."""

    host: str = Field(min_length=1)
    port: int | None = Field(None, gt=0, lt=65536, description="default: 587 for starttls, 465 for tls, 25 for plain")
    security: Literal["starttls", "tls", "plain"] = "starttls"  # plain: unencrypted, only for a local test server
    sender: str = Field(min_length=3, description="the From address")
    timeout_seconds: float = Field(30.0, gt=0)

    @property
    def effective_port(self) -> int:
        return self.port or {"starttls": 587, "tls": 465, "plain": 25}[self.security]


class DigestMail(_Strict):
    to: list[str] = Field(default_factory=list, description="recipients of the daily digest; empty: not mailed")
    resend_on_rerun: bool = False  # true: every run of the digest mails it again, not once per day


class AlertSettings(_Strict):
    email_to: list[str] = Field(default_factory=list, description="recipients of alerts; empty: no alert mail")
    webhook_format: Literal["slack", "teams"] | None = None  # the URL is the vault secret `alert_webhook_url`
    quarantine_max_age_days: int = Field(7, ge=1)
    token_idle_days: int = Field(25, ge=1, le=29)


class NotifySettings(_Strict):
    smtp: SmtpSettings | None = None
    digest: DigestMail = DigestMail()
    alerts: AlertSettings = AlertSettings()

    @model_validator(mode="after")
    def _mail_needs_smtp(self) -> "NotifySettings":
        if (self.digest.to or self.alerts.email_to) and self.smtp is None:
            raise ValueError("digest.to or alerts.email_to is set, so notify.smtp is needed")
        return self


class Connection(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    timezone: str = "Europe/Amsterdam"
    expensify: ExpensifySettings
    exact: ExactSettings
    posting: PostingRules = PostingRules()
    notify: NotifySettings = NotifySettings()

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        return _check_timezone(value)

    @property
    def expensify_credential(self) -> str:
        """The name its Expensify partner login is kept under: `expensify.credential`, else its own name."""
        return self.expensify.credential or self.name


# What connections sharing an Expensify credential must agree on: one client and one export job serve them all, and
# the job selects approval days in one timezone.
SHARED_CREDENTIAL_SETTINGS = (("timezone",), ("expensify", "endpoint_url"), ("expensify", "timestamp_timezone"),
                              ("expensify", "poll_interval_seconds"), ("expensify", "poll_timeout_seconds"))


class CategoryMapping(_Strict):
    category: str = Field(min_length=1)
    gl_account: str = Field(min_length=1)
    policy_id: str | None = None  # restricts the row to one Expensify policy


class TagLevel(_Strict):
    level: int = Field(ge=1, le=3)
    dimension: Literal["cost_center", "cost_unit"]
    values: dict[str, str] = Field(description="tag name -> dimension code")
    default: str | None = None  # used when an expense has no tag at this level


class DimensionDefaults(_Strict):
    cost_center: str | None = None
    cost_unit: str | None = None


class Defaults(_Strict):
    """`mappings/defaults.yaml`: cost center / cost unit for an expense whose tags give none.

    For each dimension, the first of these that gives a code wins: the expense's tag; the employee's row
    (`employees`, keyed by the submitter's email, case-insensitive); the category's row (`categories`); the tag
    level's own `default` in tags.yaml. A default that lands on a GL account which does not allow that dimension
    (UseCostcenter/UseCostunit = 2) is dropped; a tag that does is quarantined as COST_CENTER_NOT_ALLOWED /
    COST_UNIT_NOT_ALLOWED.

        defaults:
          employees:
            anna.devries@vermeerhals.nl: {cost_center: AMS}
          categories:
            Software: {cost_unit: INT}
    """

    employees: dict[str, DimensionDefaults] = Field(default_factory=dict)
    categories: dict[str, DimensionDefaults] = Field(default_factory=dict)

    def for_expense(self, dimension: str, employee_email: str, category: str) -> str:
        """The employee's default for `dimension`, else the category's, else ""."""
        employee = {k.lower(): v for k, v in self.employees.items()}.get((employee_email or "").lower())
        for row in (employee, self.categories.get(category)):
            code = getattr(row, dimension) if row is not None else None
            if code:
                return code
        return ""


class ProjectConfig(_Strict):
    connections: list[Connection] = Field(min_length=1)
    categories: list[CategoryMapping] = Field(default_factory=list)
    tags: list[TagLevel] = Field(default_factory=list)
    # Expensify tax name -> Exact VAT code; "" posts that tax name gross without a code. Once the table has rows,
    # a tax name missing from it quarantines the report (UNMAPPED_TAX_NAME) on a journal that allows VAT.
    vat_codes: dict[str, str] = Field(default_factory=dict, description="Expensify tax name -> Exact VAT code")
    defaults: Defaults = Defaults()
    source_dir: str = ""

    @model_validator(mode="after")
    def _unique_names(self) -> "ProjectConfig":
        names = [c.name for c in self.connections]
        if len(names) != len(set(names)):
            raise ValueError(f"connection names must be unique, got {names}")
        return self

    def connection(self, name: str) -> Connection:
        for conn in self.connections:
            if conn.name == name:
                return conn
        raise ConfigError(f"no connection named {name!r}; configured: {', '.join(c.name for c in self.connections)}",
                          path=str(Path(self.source_dir) / CONNECTIONS_FILE))

    def gl_account_for(self, category: str, policy_id: str) -> str | None:
        """The GL account code mapped to a category; a policy-specific row wins over a general one."""
        general = None
        for row in self.categories:
            if row.category == category:
                if row.policy_id == policy_id:
                    return row.gl_account
                if row.policy_id is None:
                    general = row.gl_account
        return general


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {value!r}") from exc
    return value


# --- YAML with line numbers -------------------------------------------------------------------------

class _LineDict(dict):
    lines: dict[Any, int]


class _LineList(list):
    lines: list[int]


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Remembers the line of every mapping key and list item, so errors can point at them. libyaml's parser where
    PyYAML has it: five times faster, which counts at hundreds of connections (definitions load at every start)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    result = _LineDict()
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise ConfigError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except ConfigError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1], path=str(path), line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = f" ({exc.context} on line {exc.context_mark.line + 1})" if exc.context and exc.context_mark else ""
        raise ConfigError(f"invalid YAML: {exc.problem}{context}", path=str(path),
                          line=mark.line + 1 if mark else None) from None


def _line_of(data: Any, loc: tuple) -> int | None:
    """The deepest line known along a pydantic error location."""
    line = None
    node = data
    for part in loc:
        if isinstance(node, _LineDict) and part in node:
            line = node.lines.get(part, line)
            node = node[part]
        elif isinstance(node, _LineList) and isinstance(part, int) and part < len(node):
            line = node.lines[part]
            node = node[part]
        else:
            break
    return line


# (top-level key, file, required) of every file in `mappings/`.
_SOURCES = (("connections", CONNECTIONS_FILE, True), ("categories", CATEGORIES_FILE, False), ("tags", TAGS_FILE, False),
            ("vat_codes", VAT_FILE, False), ("defaults", DEFAULTS_FILE, False))
# Folder -> (the files' texts it was parsed from, the config): see load_project_config.
_loaded: dict[tuple[str, str], tuple[tuple[str | None, ...], ProjectConfig]] = {}


def load_project_config(mappings_dir: str | Path) -> ProjectConfig:
    """Load and validate every file in `mappings/`, once per process while the files stay as they are.

    A later call for the same folder returns the same object without parsing again; an edited file (any change of
    its text, so also a same-size rewrite within one mtime tick) is loaded afresh, so a long-running process sees an
    operator's fix. Reading the few small files to compare costs far less than parsing and validating them.

    Args:
        mappings_dir: the folder holding connections.yaml, categories.yaml, tags.yaml and optionally vat.yaml
            and defaults.yaml.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the file and line of the first problem found.
    """
    folder = Path(mappings_dir)
    if not folder.is_dir():
        raise ConfigError("mappings folder not found", path=str(folder))
    texts = tuple(_read_text(folder / filename) for _, filename, _ in _SOURCES)
    key = (str(folder.resolve()), str(folder))
    cached = _loaded.get(key)
    if cached is not None and cached[0] == texts:
        return cached[1]
    config = _parse_project(folder, texts)
    _loaded[key] = (texts, config)
    return config


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _parse_project(folder: Path, texts: tuple[str | None, ...]) -> ProjectConfig:
    sources: dict[str, tuple[Path, Any]] = {}
    for (key, filename, required), text in zip(_SOURCES, texts):
        path = folder / filename
        if text is None:
            if required:
                raise ConfigError("file not found", path=str(path))
            continue
        document = _parse_yaml(path, text)
        if not isinstance(document, dict) or key not in document:
            raise ConfigError(f"expected a top-level key {key!r}", path=str(path), line=1)
        extra = set(document) - {key}
        if extra:
            raise ConfigError(f"unknown top-level key {sorted(extra)[0]!r}", path=str(path),
                              line=document.lines.get(sorted(extra)[0]))
        sources[key] = (path, document)

    combined = {key: document[key] for key, (_, document) in sources.items()}
    try:
        config = ProjectConfig(**combined, source_dir=str(folder))
    except ValidationError as exc:
        # An unknown key points at its own line, a missing one only at its parent: report the precise one first.
        error = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = error["loc"][0]
        path, document = sources.get(key, (folder / CONNECTIONS_FILE, {}))
        where = ".".join(str(p) for p in error["loc"])
        raise ConfigError(f"{where}: {error['msg']}", path=str(path), line=_line_of(document, error["loc"])) from None
    _check_cross_references(config, sources)
    return config


def _check_cross_references(config: ProjectConfig, sources: dict[str, tuple[Path, Any]]) -> None:
    _check_shared_credentials(config, *sources["connections"])
    if "categories" in sources:
        path, document = sources["categories"]
        seen: dict[tuple[str, str | None], int] = {}
        for index, row in enumerate(config.categories):
            key = (row.category, row.policy_id)
            line = document["categories"].lines[index]
            if key in seen:
                raise ConfigError(f"category {row.category!r} is mapped twice (first on line {seen[key]})",
                                  path=str(path), line=line)
            seen[key] = line
    if "tags" in sources:
        path, document = sources["tags"]
        levels: dict[int, int] = {}
        for index, level in enumerate(config.tags):
            line = document["tags"].lines[index]
            if level.level in levels:
                raise ConfigError(f"tag level {level.level} is configured twice (first on line {levels[level.level]})",
                                  path=str(path), line=line)
            levels[level.level] = line


def _check_shared_credentials(config: ProjectConfig, path: Path, document: Any) -> None:
    """Connections sharing an Expensify credential are exported together and split by policy ID afterwards, so a
    policy belongs to one of them, and they use one client and one export job: the same
    `SHARED_CREDENTIAL_SETTINGS`."""
    first: dict[str, int] = {}  # credential -> index of its first connection
    owners: dict[tuple[str, str], int] = {}  # (credential, policy ID) -> index of the connection listing it
    for index, conn in enumerate(config.connections):
        credential = conn.expensify_credential
        node = document["connections"][index]
        lead = config.connections[first.setdefault(credential, index)]
        for keys in SHARED_CREDENTIAL_SETTINGS:
            mine, theirs = _setting(conn, keys), _setting(lead, keys)
            if mine != theirs:
                raise ConfigError(
                    f"connections {lead.name} and {conn.name} share Expensify credential {credential!r} but not "
                    f"{'.'.join(keys)} ({theirs!r} and {mine!r}): one export job a day serves both; give them the "
                    f"same, or credentials of their own", path=str(path), line=_line_of(node, keys))
        for position, policy in enumerate(conn.expensify.policy_ids):
            other = owners.setdefault((credential, policy), index)
            if other != index:
                raise ConfigError(
                    f"policy {policy} is listed by connections {config.connections[other].name} and {conn.name}, "
                    f"which share Expensify credential {credential!r}: their reports are told apart by policy, so a "
                    f"policy belongs to one connection per credential", path=str(path),
                    line=_line_of(node, ("expensify", "policy_ids", position)))


def _setting(conn: Connection, keys: tuple[str, ...]) -> Any:
    value: Any = conn
    for key in keys:
        value = getattr(value, key)
    return value
