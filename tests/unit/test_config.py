"""The mappings/ loader: the shipped config loads, and every kind of mistake is named with its file and line."""

from pathlib import Path

import pytest

from expensify_exact.config import load_project_config
from expensify_exact.errors import ConfigError
from tests.conftest import MAPPINGS


def test_shipped_mappings_load_and_cover_the_demo_categories():
    config = load_project_config(MAPPINGS)
    assert [c.name for c in config.connections] == ["vermeerhals-nl"]
    assert config.gl_account_for("Hotel", "any-policy") == "4510"
    assert config.gl_account_for("Gifts", "any-policy") is None  # the seeded unmapped category
    assert config.vat_codes["Laag 9%"] == "2"


def _copy(tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, target)
    return target


@pytest.mark.parametrize(
    ("filename", "find", "replace", "line", "message"),
    [
        # A typo in a key must not be silently ignored.
        ("connections.yaml", "      journal: \"90\"", "      jurnal: \"90\"", 15, "jurnal"),
        # A division is a positive integer.
        ("connections.yaml", "division: 123456", "division: abc", 13, "division"),
        # An unknown timezone would shift every partition.
        ("connections.yaml", "timezone: Europe/Amsterdam ", "timezone: Europe/Amstrdam ", 5, "unknown timezone"),
        # A category mapped twice is ambiguous.
        ("categories.yaml", "  - {category: Hotel, gl_account: \"4510\"}",
         "  - {category: Hotel, gl_account: \"4510\"}\n  - {category: Hotel, gl_account: \"4520\"}", 5, "mapped twice"),
        # Broken YAML points at the line the parser stopped on and names where the construct began.
        ("tags.yaml", "      Rotterdam: RTM", "      Rotterdam: [RTM", 8, "flow sequence on line 7"),
        # A dimension name that does not exist.
        ("tags.yaml", "dimension: cost_unit", "dimension: project", 11, "dimension"),
        # The second of two duplicate keys is an error, not "last one wins".
        ("tags.yaml", "      Utrecht: UTR", "      Utrecht: UTR\n      Utrecht: AMS", 9, "duplicate key"),
    ],
)
def test_config_errors_name_file_and_line(tmp_path, filename, find, replace, line, message):
    folder = _copy(tmp_path)
    path = folder / filename
    text = path.read_text()
    assert find in text, "the case no longer matches the shipped file"
    path.write_text(text.replace(find, replace, 1))
    with pytest.raises(ConfigError) as error:
        load_project_config(folder)
    assert error.value.path == str(path)
    assert error.value.line == line, str(error.value)
    assert message in str(error.value)
    assert str(error.value).startswith(f"{path}:{line}: ")


def test_missing_connections_file_is_reported(tmp_path):
    folder = _copy(tmp_path)
    (folder / "connections.yaml").unlink()
    with pytest.raises(ConfigError, match="connections.yaml: file not found"):
        load_project_config(folder)


NOTIFY = """    notify:
      smtp: {host: smtp.example.nl, security: starttls, sender: bot@example.nl}
      digest:
        to: [accountant@example.nl]
      alerts:
        webhook_format: slack
"""


@pytest.mark.parametrize(("find", "replace", "offset", "message"), [
    ("security: starttls", "security: ssl", 1, "notify.smtp.security"),  # neither starttls, tls nor plain
    ("webhook_format: slack", "webhook_format: discord", 5, "notify.alerts.webhook_format"),
    ("      smtp: {host: smtp.example.nl, security: starttls, sender: bot@example.nl}\n", "", 0,
     "notify.smtp is needed"),  # recipients without a mail server
])
def test_notify_settings_errors_name_the_line(tmp_path, find, replace, offset, message):
    folder = _copy(tmp_path)
    path = folder / "connections.yaml"
    text = path.read_text()
    notify_line = len(text.splitlines()) + 1
    path.write_text(text + NOTIFY.replace(find, replace))
    with pytest.raises(ConfigError) as error:
        load_project_config(folder)
    assert error.value.line == notify_line + offset, str(error.value)
    assert message in str(error.value)


def test_notify_defaults_send_nothing_and_ports_follow_the_security(tmp_path):
    folder = _copy(tmp_path)
    path = folder / "connections.yaml"
    assert load_project_config(folder).connections[0].notify.digest.to == []
    path.write_text(path.read_text() + NOTIFY)
    notify = load_project_config(folder).connections[0].notify
    assert notify.smtp.effective_port == 587 and notify.alerts.quarantine_max_age_days == 7
    assert notify.alerts.token_idle_days == 25 and notify.digest.to == ["accountant@example.nl"]


def test_the_config_is_parsed_once_per_folder_until_a_file_changes(tmp_path):
    folder = _copy(tmp_path)
    first = load_project_config(folder)
    assert load_project_config(str(folder)) is first  # no second parse: the commands and assets share it

    # A same-size edit (one mtime tick may not tell it apart) is still seen: a long-running process follows it.
    categories = folder / "categories.yaml"
    text = categories.read_text()
    edited = text.replace('category: Hotel, gl_account: "4510"', 'category: Hotel, gl_account: "4511"')
    assert edited != text and len(edited) == len(text)
    categories.write_text(edited)
    second = load_project_config(folder)
    assert second is not first and second.gl_account_for("Hotel", "any-policy") == "4511"

    # A broken edit raises every time instead of serving the last good config; the fix is picked up.
    categories.write_text(edited + "  - {category: Hotel, gl_account: \"4512\"}\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match="mapped twice"):
            load_project_config(folder)
    categories.write_text(text)
    assert load_project_config(folder).gl_account_for("Hotel", "any-policy") == "4510"
