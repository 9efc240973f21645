"""The one-click template catalog: JSON files shipped in `services/clusters/templates/`.

A template file holds a stable UUID, `slug`, `name`, `description`, `category`, `version`,
`parameters` (a JSON Schema 2020-12 object), `database` (also create a managed database bound to
the app) and `spec`: the instance create request (`image`, `ports`, `env`, `resources`,
`replicas`, ...) with `${param}` placeholders. A string that is exactly one placeholder takes
the parameter's value with its JSON type (so `"replicas": "${replicas}"` stays an integer); a
placeholder inside a longer string is replaced by its text. `${name}` is the new app's name.

Parameters are validated with the `jsonschema` library; the schema's `default`s fill absent
top-level properties first. Every failing field is reported at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from libs.errors import InvalidArgument

CATALOG = Path(__file__).parent / "templates"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Template:
    id: str
    slug: str
    name: str
    description: str
    category: str
    version: str
    parameters: dict[str, Any]
    spec: dict[str, Any]
    database: bool


def load(directory: Path = CATALOG) -> dict[str, Template]:
    """Every template of the catalog by id; a malformed file stops the service at start (a
    catalog is code: its test checks every file)."""
    out: dict[str, Template] = {}
    for path in sorted(directory.glob("*.json")):
        raw = json.loads(path.read_text())
        Draft202012Validator.check_schema(raw["parameters"])
        t = Template(
            id=raw["id"],
            slug=raw["slug"],
            name=raw["name"],
            description=raw["description"],
            category=raw.get("category", ""),
            version=raw["version"],
            parameters=raw["parameters"],
            spec=raw["spec"],
            database=bool(raw.get("database", False)),
        )
        if t.id in out:
            raise ValueError(f"template id {t.id} is used twice ({path.name})")
        out[t.id] = t
    return out


def _field(err: ValidationError) -> str:
    path = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "required":
        missing = re.match(r"'([^']+)' is a required property", err.message)
        name = missing.group(1) if missing else ""
        return ".".join(x for x in (path, name) if x)
    if err.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", err.message)
        return ".".join(x for x in (path, extra[0] if extra else "") if x)
    return path or "parameters"


def validate(t: Template, given: dict[str, Any]) -> dict[str, Any]:
    """The parameters with defaults filled in; InvalidArgument naming every failing field."""
    values = dict(given)
    for name, prop in (t.parameters.get("properties") or {}).items():
        if name not in values and isinstance(prop, dict) and "default" in prop:
            values[name] = prop["default"]
    errors = sorted(
        Draft202012Validator(t.parameters).iter_errors(values), key=lambda e: list(e.absolute_path)
    )
    if errors:
        fields: dict[str, str] = {}
        for e in errors:
            fields.setdefault(f"parameters.{_field(e)}", e.message)
        raise InvalidArgument(
            f"the parameters do not match template {t.slug!r}: " + ", ".join(sorted(fields)), fields=fields
        )
    return values


def render(value: Any, params: dict[str, Any]) -> Any:
    """The spec with every `${param}` replaced (see the module docstring)."""
    if isinstance(value, dict):
        return {k: render(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, params) for v in value]
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(1) in params:
            return params[whole.group(1)]

        def sub(m: re.Match[str]) -> str:
            v = params.get(m.group(1), m.group(0))
            return json.dumps(v) if isinstance(v, bool) else str(v)

        return _PLACEHOLDER.sub(sub, value)
    return value
