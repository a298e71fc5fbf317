"""The generated reference docs: ``docs/configuration.md`` and ``docs/protocol.schema.json``.

Both are written from the code itself, so they cannot drift from it: the configuration
reference from the settings classes (:class:`chatgate.config.Settings` and every registered
provider's :class:`~chatgate.providers.base.ProviderSettings`), each field's variables,
type, default and ``description``; the protocol schema from the native protocol's message
types (the server events of :mod:`chatgate.chat.events` and
:mod:`chatgate.api.dialects.base`, the client frames of :mod:`chatgate.api.dialects.native`)
through pydantic's JSON Schema generation.

``python -m chatgate.docs [DOCS_DIR]`` writes both (into ``docs/`` by default); the tests
compare the committed files with :func:`configuration_markdown` and
:func:`protocol_schema_text`.
"""

from __future__ import annotations

import functools
import json
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    Required,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

import typing_extensions
from pydantic import AliasChoices, BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

import chatgate.providers  # noqa: F401  (registers the providers and their settings)
from chatgate.api.dialects.base import Outgoing
from chatgate.api.dialects.native import ClientFrame
from chatgate.config import Settings
from chatgate.providers.base import registered_providers

CONFIGURATION_FILE = "configuration.md"
SCHEMA_FILE = "protocol.schema.json"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

#: Defaults computed from the machine that imports the settings, shown as the rule instead.
_SHOWN_DEFAULTS: dict[tuple[type[BaseModel], str], str] = {
    (Settings, "data_dir"): "`$XDG_DATA_HOME/chatgate`, else `~/.local/share/chatgate`",
}

#: The groups of :class:`Settings`' fields, in the order the reference shows them; a field
#: in none of them lands in "Other".
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Server", ("host", "port", "workers", "drain_s", "log_level", "debug", "trace_content")),
    ("Upstream and models", (
        "provider", "model", "fallback_models", "request_timeout_s", "connect_timeout_s",
        "breaker_failures", "breaker_cooldown_s",
    )),
    ("Generation", (
        "agents_dir", "temperature", "num_ctx", "max_tokens", "max_answer_tokens", "max_answer_s",
    )),
    ("Conversations and store", (
        "store", "data_dir", "enable_memory", "memory_max_turns", "session_ttl_s", "memory_ttl_min",
        "sequential_session_ttl_s", "max_conversations", "checkpoint_s", "resume_grace_s",
    )),
    ("Access", ("api_keys", "secret", "public_paths", "cors_origins", "allowed_hosts")),
    ("Limits", (
        "rate_limit", "max_streams_per_client", "max_connections", "max_message_bytes",
        "max_header_bytes", "max_headers", "header_timeout_s", "body_timeout_s",
        "keepalive_timeout_s", "max_connections_per_address", "send_buffer_bytes",
    )),
)

#: Standard variables read by the libraries chatgate hands telemetry to
#: (:mod:`chatgate.telemetry.otel`, :mod:`chatgate.telemetry.datadog`).
_STANDARD_VARIABLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("OpenTelemetry", (
        ("OTEL_SDK_DISABLED", "`true` exports nothing, whatever else is set."),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTLP endpoint for traces and metrics; setting it turns both exports on."),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTLP endpoint for traces only; setting it turns trace export on."),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTLP endpoint for metrics only; setting it turns metric export on."),
        ("OTEL_TRACES_EXPORTER", "`otlp` or `none` (anything else stops start-up); unset: `otlp` when an endpoint is set."),
        ("OTEL_METRICS_EXPORTER", "`otlp` or `none` (anything else stops start-up); unset: `otlp` when an endpoint is set."),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "`http/protobuf` (default) or `grpc`."),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "The protocol for traces only."),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "The protocol for metrics only."),
        ("OTEL_SERVICE_NAME", "The service name on every span and metric (read by the SDK)."),
        ("OTEL_RESOURCE_ATTRIBUTES", "More resource attributes (read by the SDK)."),
    )),
    ("Datadog LLM Observability (the `datadog` extra)", (
        ("DD_LLMOBS_ENABLED", "`1` or `true`: every generation is an LLM Observability span."),
        ("DD_LLMOBS_ML_APP", "The ML application the spans belong to (read by ddtrace)."),
        ("DD_API_KEY", "Datadog API key; required in agentless mode (read by ddtrace)."),
        ("DD_SITE", "Datadog site, e.g. `datadoghq.eu` (read by ddtrace)."),
        ("DD_LLMOBS_AGENTLESS_ENABLED", "`false` sends through a local Datadog Agent; default agentless."),
        ("DD_ENV", "Environment tag (read by ddtrace)."),
        ("DD_SERVICE", "Service tag (read by ddtrace)."),
        ("DD_APM_TRACING_ENABLED", "APM tracing besides LLM Observability; chatgate sets it to `false` unless given."),
    )),
)


def settings_classes() -> list[tuple[str, type[BaseModel]]]:
    """The gateway's settings, then each registered provider's, with a section title."""
    classes: list[tuple[str, type[BaseModel]]] = [("Gateway", Settings)]
    for name, registration in sorted(registered_providers().items()):
        classes.append((f"Provider `{name}`", registration.settings))
    return classes


def variables(info: FieldInfo, name: str) -> list[str]:
    """A field's variables, its main one first."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [name.upper()]


def configuration_markdown(classes: Iterable[tuple[str, type[BaseModel]]] | None = None) -> str:
    """The configuration reference, for ``classes`` (by default :func:`settings_classes`)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m chatgate.docs` from the settings classes; do not edit. -->",
        "",
        "Every setting is an environment variable, also read from a `.env` file in the working",
        "directory (names in any case; an empty value counts as unset); `chatgate serve` flags",
        "win over both. The first name is chatgate's own; the others are the names the systems",
        "chatgate replaces used, and keep working (see [migration.md](migration.md)). A wrong",
        "value stops start-up with one line naming the variable.",
        "",
    ]
    for title, model in settings_classes() if classes is None else classes:
        lines += [f"## {title}", ""]
        fields = dict(model.model_fields)
        if model is Settings:
            for group, names in _GROUPS:
                lines += [f"### {group}", "", *_table(model, [(n, fields.pop(n)) for n in names if n in fields])]
            if fields:
                lines += ["### Other", "", *_table(model, list(fields.items()))]
        else:
            if model.__doc__ and model.__doc__ is not _base_doc(model):
                lines += [" ".join(model.__doc__.split()).replace("``", "`"), ""]
            lines += _table(model, list(fields.items()))
    lines += [
        "## Standard variables",
        "",
        "Read by the OpenTelemetry SDK and ddtrace as for any application; chatgate acts on",
        "these (see [observability.md](observability.md)).",
        "",
    ]
    for group, entries in _STANDARD_VARIABLES:
        lines += [f"### {group}", "", "| variable | meaning |", "|---|---|"]
        lines += [f"| `{name}` | {meaning} |" for name, meaning in entries]
        lines.append("")
    return "\n".join(lines)


def undocumented(
    markdown: str, classes: Iterable[tuple[str, type[BaseModel]]] | None = None
) -> list[str]:
    """``Class.field`` for each settings field ``markdown`` does not document: its main
    variable has no row there, or the field has no description to give it."""
    missing = []
    for _, model in settings_classes() if classes is None else classes:
        for name, info in model.model_fields.items():
            if not info.description or f"| `{variables(info, name)[0]}`" not in markdown:
                missing.append(f"{model.__name__}.{name}")
    return missing


def _base_doc(model: type[BaseModel]) -> str | None:
    """The docstring ``model`` inherits, so only its own is shown."""
    return next((base.__doc__ for base in model.__mro__[1:] if base.__doc__), None)


def _table(model: type[BaseModel], fields: list[tuple[str, FieldInfo]]) -> list[str]:
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, info in fields:
        names = variables(info, name)
        shown = f"`{names[0]}`" + (f" (also {', '.join(f'`{n}`' for n in names[1:])})" if names[1:] else "")
        rows.append(
            f"| {shown} | {_type_name(info)} | {_default(model, name, info)} | "
            f"{_escape(info.description or '')} |"
        )
    return [*rows, ""]


#: How the reference names a field's Python type.
_TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "Path": "path", "SecretStr": "secret string"}


def _type_name(info: FieldInfo) -> str:
    annotation = info.annotation
    optional = type(None) in get_args(annotation)
    if optional:
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        text = " \\| ".join(f"`{choice}`" for choice in get_args(annotation))
    else:
        name = getattr(annotation, "__name__", str(annotation))
        text = _TYPE_NAMES.get(name, name)
    text += ", optional" if optional else ""
    bounds = [
        f"{symbol} {getattr(meta, attr)}"
        for meta in info.metadata
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
        if getattr(meta, attr, None) is not None
    ]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _default(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    if (model, name) in _SHOWN_DEFAULTS:
        return _SHOWN_DEFAULTS[model, name]
    value: Any = info.default
    if value is PydanticUndefined or value is None:
        return "unset"
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def protocol_schema() -> dict[str, Any]:
    """The native WebSocket protocol as JSON Schema (draft 2020-12): ``$defs`` holds
    ``ClientFrame`` and ``ServerFrame`` (each a union on ``type``) and what they use; the
    document itself accepts either."""
    client = TypeAdapter(_for_pydantic(ClientFrame)).json_schema(ref_template="#/$defs/{model}")
    server = TypeAdapter(_for_pydantic(Outgoing)).json_schema(ref_template="#/$defs/{model}")
    server_defs = server.pop("$defs", {})
    # The server sends nothing beyond its types' fields; clients may (they are ignored).
    for definition in server_defs.values():
        if definition.get("type") == "object" and "properties" in definition:
            definition["additionalProperties"] = False
    defs = {**client.pop("$defs", {}), **server_defs}
    defs["ClientFrame"] = {"description": "A frame a client sends on /ws.", **client}
    defs["ServerFrame"] = {"description": "A frame the gateway sends on /ws.", **server}
    return {
        "$schema": DRAFT_2020_12,
        "title": "chatgate native WebSocket protocol (/ws)",
        "description": "Generated by `python -m chatgate.docs` from chatgate's message types; see protocol.md.",
        "oneOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/ServerFrame"}],
        "$defs": dict(sorted(defs.items())),
    }


def _for_pydantic(hint: Any) -> Any:
    """``hint`` with each ``typing.TypedDict`` in it rebuilt as a ``typing_extensions`` one:
    pydantic refuses the former before Python 3.12."""
    origin = get_origin(hint)
    if typing_extensions.is_typeddict(hint):
        return _rebuilt(hint)
    if origin is Annotated:
        inner, *metadata = get_args(hint)
        return Annotated[(_for_pydantic(inner), *metadata)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_for_pydantic(arg) for arg in get_args(hint))]  # noqa: UP007
    if origin in (list, dict):
        return origin[tuple(_for_pydantic(arg) for arg in get_args(hint))]
    return hint


@functools.cache
def _rebuilt(typed_dict: type) -> Any:
    fields: dict[str, Any] = {}
    for name, hint in get_type_hints(typed_dict, include_extras=True).items():
        # Under ``from __future__ import annotations`` Python 3.11 counts a NotRequired
        # key as required: the hint itself says which it is.
        wrapper = get_origin(hint)
        if wrapper in (Required, NotRequired):
            hint = get_args(hint)[0]
        else:
            wrapper = Required if name in typed_dict.__required_keys__ else NotRequired  # type: ignore[attr-defined]
        fields[name] = wrapper[_for_pydantic(hint)]
    rebuilt = cast(Any, typing_extensions.TypedDict)(typed_dict.__name__, fields)
    rebuilt.__doc__ = typed_dict.__doc__
    return rebuilt


def protocol_schema_text() -> str:
    return json.dumps(protocol_schema(), indent=2, ensure_ascii=False) + "\n"


def generated_files() -> dict[str, str]:
    """Each generated file's name in ``docs/`` and its text."""
    return {CONFIGURATION_FILE: configuration_markdown(), SCHEMA_FILE: protocol_schema_text()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path("docs")
    for name, text in generated_files().items():
        (target / name).write_text(text, encoding="utf-8")
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
