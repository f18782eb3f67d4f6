"""Where each row of `mappings/*.yaml` sits (file and line), for messages that point at the row to fix.

config.py keeps line numbers only while it validates; this re-reads the same files with PyYAML's composer,
which keeps every node's position, and answers "which line maps category X / tag Y / connection key Z?".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from expensify_exact.config import CATEGORIES_FILE, CONNECTIONS_FILE, TAGS_FILE, VAT_FILE

DEFAULTS_FILE = "defaults.yaml"


@dataclass(frozen=True)
class Location:
    path: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


class MappingLocations:
    """Line numbers of the rows of one mappings folder. A lookup that finds nothing returns just the file."""

    def __init__(self, mappings_dir: str | Path):
        self.folder = Path(mappings_dir)
        self._lines: dict[str, dict[tuple, int]] = {}
        self._nodes: dict[str, yaml.Node | None] = {}
        for filename in (CONNECTIONS_FILE, CATEGORIES_FILE, TAGS_FILE, VAT_FILE, DEFAULTS_FILE):
            node = _compose(self.folder / filename)
            self._nodes[filename] = node
            lines: dict[tuple, int] = {}
            if node is not None:
                _index(node, (), lines)
            self._lines[filename] = lines

    def file(self, filename: str) -> Location:
        return Location(str(self.folder / filename))

    def at(self, filename: str, *path) -> Location:
        """The line of the key or list item at `path` (keys and list indexes), e.g. ("tags", 0, "values", "Utrecht")."""
        return Location(str(self.folder / filename), self._lines.get(filename, {}).get(tuple(path)))

    def category(self, category: str, policy_id: str | None = None) -> Location:
        """The row mapping `category` (for `policy_id`, or the general row if that is what applies)."""
        rows = self._rows(CATEGORIES_FILE, "categories")
        general = None
        for index, row in enumerate(rows):
            if row.get("category") != category:
                continue
            if policy_id is not None and row.get("policy_id") == policy_id:
                return self.at(CATEGORIES_FILE, "categories", index)
            if row.get("policy_id") is None and general is None:
                general = index
        return self.at(CATEGORIES_FILE, "categories", general) if general is not None else self.file(CATEGORIES_FILE)

    def tag_level(self, level: int) -> Location:
        for index, row in enumerate(self._rows(TAGS_FILE, "tags")):
            if row.get("level") == level:
                return self.at(TAGS_FILE, "tags", index)
        return self.file(TAGS_FILE)

    def tag(self, level: int, name: str) -> Location:
        """The `name: CODE` line under tag level `level`."""
        for index, row in enumerate(self._rows(TAGS_FILE, "tags")):
            if row.get("level") == level:
                found = self.at(TAGS_FILE, "tags", index, "values", name)
                return found if found.line else self.at(TAGS_FILE, "tags", index)
        return self.file(TAGS_FILE)

    def tag_default(self, level: int) -> Location:
        for index, row in enumerate(self._rows(TAGS_FILE, "tags")):
            if row.get("level") == level:
                found = self.at(TAGS_FILE, "tags", index, "default")
                return found if found.line else self.at(TAGS_FILE, "tags", index)
        return self.file(TAGS_FILE)

    def vat(self, tax_name: str) -> Location:
        return self.at(VAT_FILE, "vat_codes", tax_name)

    def default(self, section: str, key: str, dimension: str) -> Location:
        """A `defaults.yaml` row, e.g. default("employees", "anna@example.nl", "cost_center")."""
        for depth in (3, 2):
            found = self.at(DEFAULTS_FILE, "defaults", section, *(key, dimension)[:depth - 1])
            if found.line:
                return found
        return self.file(DEFAULTS_FILE)

    def connection(self, name: str, *keys: str) -> Location:
        """The line of a connection's key, e.g. connection("vermeerhals-nl", "exact", "journal")."""
        for index, row in enumerate(self._rows(CONNECTIONS_FILE, "connections")):
            if row.get("name") == name:
                for depth in range(len(keys), -1, -1):
                    found = self.at(CONNECTIONS_FILE, "connections", index, *keys[:depth])
                    if found.line:
                        return found
        return self.file(CONNECTIONS_FILE)

    def _rows(self, filename: str, key: str) -> list[dict]:
        node = self._nodes.get(filename)
        document = _plain(node) if node is not None else None
        rows = document.get(key) if isinstance(document, dict) else None
        return [row if isinstance(row, dict) else {} for row in rows] if isinstance(rows, list) else []


def _compose(path: Path) -> yaml.Node | None:
    try:
        return yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return None  # load_project_config reports these with their own file:line


def _index(node: yaml.Node, prefix: tuple, out: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _plain(key_node)
            out.setdefault(prefix + (key,), key_node.start_mark.line + 1)
            _index(value_node, prefix + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            out.setdefault(prefix + (index,), child.start_mark.line + 1)
            _index(child, prefix + (index,), out)


def _plain(node: yaml.Node):
    """The Python value of a composed node (safe tags only)."""
    return yaml.SafeLoader("").construct_document(node) if node is not None else None
