"""The API page and the OpenAPI document.

`OfflineSwagger` serves Swagger UI from the `swagger-ui-bundle-v2` package (its files are not in
our repository) under `/schema/assets/`, with no CDN and no inline script, so `/schema` works
offline and under our Content-Security-Policy.

`refine` fills in what Litestar's generator leaves out, so the document says what the server
does: `additionalProperties: false` on request bodies whose model forbids extra keys, PATCH
fields that are optional but never null, the "0 or at least the floor" rule of the
temperatures, the `text/event-stream` answer of the fill routes with its event shapes, and
links between operations (a created document's id and ETag to its reads, edits and fills; a
revision's number to regenerate, choose and diff; a batch job's id to its status and results).
"""

from __future__ import annotations

import html
import importlib.resources
from pathlib import Path
from typing import Any

from litestar import Request, Router
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Link, OpenAPI, OpenAPIMediaType, OpenAPIType, Operation, Reference, Schema
from litestar.static_files import create_static_files_router
from pydantic import BaseModel

from editor.options import MIN_TEMPERATURE, REFERENCE_SCHEDULES, SamplerOptions
from editor.server.schemas import StepEvent

ASSETS = "/assets"  # under the schema path
MAX_ID = 2**63 - 1
SSE = "text/event-stream"


def swagger_ui_directory() -> Path:
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return Path(str(swagger_ui_path))


def our_static_directory() -> Path:
    return Path(str(importlib.resources.files("editor.templates") / "static"))


class OfflineSwagger(SwaggerRenderPlugin):
    """Swagger UI from local files: the package's bundle and our small start-up script."""

    def __init__(self, schema_path: str = "/schema") -> None:
        base = schema_path.rstrip("/") + ASSETS
        super().__init__(
            js_url=f"{base}/swagger-ui-bundle.js",
            css_url=f"{base}/swagger-ui.css",
            standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
            path="/swagger",
            favicon=f'<link rel="icon" type="image/png" href="{base}/favicon-32x32.png">',
        )
        self.init_js_url = f"{base}/swagger-init.js"

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = html.escape(str(openapi_schema["info"]["title"]))
        spec = html.escape(self.get_openapi_json_route(request))
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f'{self.favicon}<link href="{self.css_url}" rel="stylesheet"></head><body>'
            '<div id="swagger-container"></div>'
            f'<script src="{self.js_url}"></script><script src="{self.standalone_preset_js_url}"></script>'
            f'<script src="{self.init_js_url}" data-spec="{spec}"></script>'
            "</body></html>"
        ).encode()

    def receive_router(self, router: Router) -> None:
        super().receive_router(router)
        router.register(
            create_static_files_router(
                path=ASSETS,
                directories=[swagger_ui_directory(), our_static_directory()],
                include_in_schema=False,
                name="swagger-assets",
            )
        )


# --------------------------------------------------------------------------- refining the document


def _models() -> dict[str, type[BaseModel]]:
    """Every pydantic model of this package, by class name (Litestar names components so)."""
    found: dict[str, type[BaseModel]] = {}
    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model.__module__.startswith("editor."):
            found[model.__name__] = model
    return found


# pydantic's JSON-schema keyword -> the attribute of Litestar's Schema
_CONSTRAINTS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
}


def _copy_constraints(model: type[BaseModel], schema: Schema) -> None:
    """Bounds as pydantic states them: Litestar drops a bound of 0 (`ge=0` reads as false) and
    writes integer bounds as floats."""
    properties = model.model_json_schema().get("properties", {})
    for name, prop in (schema.properties or {}).items():
        source = properties.get(name, {})
        if not isinstance(prop, Schema) or not source:
            continue
        for branch in [source, *source.get("anyOf", [])]:
            for keyword, attribute in _CONSTRAINTS.items():
                if keyword in branch:
                    setattr(prop, attribute, branch[keyword])


def _drop_null(schema: Schema | Reference) -> Schema | Reference:
    """`string | null` -> `string` (keeping the constraints Litestar put beside the oneOf)."""
    if isinstance(schema, Schema) and schema.one_of:
        kept = [s for s in schema.one_of if not (isinstance(s, Schema) and s.type == "null")]
        if len(kept) == 1 and isinstance(kept[0], Schema):
            schema.type, schema.one_of = kept[0].type, None
    return schema


def _event(name: str, data: Schema | Reference, description: str) -> Schema:
    """One kind of server-sent event: its name, and its `data` line as JSON of the given shape."""
    return Schema(
        type=OpenAPIType.OBJECT,
        description=description,
        properties={
            "event": Schema(const=name),
            "id": Schema(type=OpenAPIType.STRING, description="the step number"),
            "data": Schema(type=OpenAPIType.STRING, content_media_type="application/json", content_schema=data),
        },
        required=["event", "data"],
    )


def _event_stream(result: Schema | Reference | None) -> OpenAPIMediaType:
    events = [_event("step", Reference(ref="#/components/schemas/StepEvent"), "one per sampler step")]
    if result is not None:
        events.append(_event("result", result, "last: the JSON body that the plain response has"))
    events.append(_event("error", Reference(ref="#/components/schemas/ErrorOut"), "last, if the fill failed"))
    return OpenAPIMediaType(
        schema=Schema(
            one_of=events,
            description="Server-sent events: `step` events, one per sampler step, then one `result` or one "
            "`error`. Each event's `data` is one line of JSON.",
        )
    )


def _streaming_operations(openapi: OpenAPI) -> list[tuple[Operation, str]]:
    """(operation, success status) of every route that answers with server-sent events."""
    found = []
    for item in (openapi.paths or {}).values():
        operation = item.post
        if operation is None or not operation.responses:
            continue
        for status, response in operation.responses.items():
            if status.startswith("2") and "server-sent events" in getattr(response, "description", ""):
                found.append((operation, status))
    return found


def _exact_bound(value: float | None) -> float | None:
    """Litestar writes integer bounds as floats, and float(2**63 - 1) is 2**63: write them exactly."""
    if isinstance(value, float) and value.is_integer():
        return MAX_ID if value == float(MAX_ID) else int(value)
    return value


def _integer_parameters(openapi: OpenAPI) -> None:
    for item in (openapi.paths or {}).values():
        for operation in (item.get, item.put, item.post, item.patch, item.delete):
            for parameter in (operation.parameters or []) if operation is not None else []:
                schema = getattr(parameter, "schema", None)
                if isinstance(schema, Schema) and schema.type == "integer":
                    schema.minimum = _exact_bound(schema.minimum)
                    schema.maximum = _exact_bound(schema.maximum)


def _reference_schedules() -> list[Schema | Reference]:
    """A reference sampler takes only its own schedules (`SamplerOptions`' cross-field rule): no
    reference, or each reference with its schedules (an absent schedule is "confidence", which
    every reference has)."""
    variants: list[Schema | Reference] = [
        Schema(schema_not=Schema(required=["reference"])),
        Schema(properties={"reference": Schema(type=OpenAPIType.NULL)}, required=["reference"]),
    ]
    for reference, schedules in REFERENCE_SCHEDULES.items():
        variants.append(
            Schema(
                properties={"reference": Schema(const=reference), "schedule": Schema(enum=list(schedules))},
                required=["reference"],
            )
        )
    return variants


def _header_parameters(openapi: OpenAPI) -> None:
    """An optional header is absent or a string, never null (If-Match: `str | None` in Python)."""
    for item in (openapi.paths or {}).values():
        for operation in (item.get, item.put, item.post, item.patch, item.delete):
            for parameter in (operation.parameters or []) if operation is not None else []:
                schema = getattr(parameter, "schema", None)
                if getattr(parameter, "param_in", None) == "header" and isinstance(schema, Schema):
                    _drop_null(schema)


# OpenAPI links: which response feeds which next call (clients and schemathesis' stateful mode
# follow them: create -> fill -> revisions -> regenerate / choose / diff -> edit -> delete).
_DOCUMENT = {"document_id": "$response.body#/id"}
_VERSIONED = _DOCUMENT | {"header.If-Match": "$response.header.ETag"}
_REVISION = {"document_id": "$response.body#/document_id", "number": "$response.body#/number"}
_AFTER_DOCUMENT = {
    "ReadDocument": ("ApiV1DocumentsDocumentIdRead", _DOCUMENT),
    "EditDocument": ("ApiV1DocumentsDocumentIdUpdate", _VERSIONED),
    "ReplaceDocument": ("ApiV1DocumentsDocumentIdReplace", _VERSIONED),
    "DeleteDocument": ("ApiV1DocumentsDocumentIdRemove", _VERSIONED),
    "FillDocument": ("ApiV1DocumentsDocumentIdFillFill", _VERSIONED),
    "ListRevisions": ("ApiV1DocumentsDocumentIdRevisionsListRevisions", _DOCUMENT),
}
_AFTER_REVISION = {
    "ReadRevision": ("ApiV1DocumentsDocumentIdRevisionsNumberRead", _REVISION),
    "RegenerateFirstSpan": (
        "ApiV1DocumentsDocumentIdRevisionsNumberSpansKeyRegenerateRegenerate",
        _REVISION | {"key": "0"},
    ),
    "ChooseForFirstSpan": ("ApiV1DocumentsDocumentIdRevisionsNumberSpansKeyChooseChoose", _REVISION | {"key": "0"}),
    "DiffWithItself": (
        "ApiV1DocumentsDocumentIdDiffDiff",
        {
            "document_id": "$response.body#/document_id",
            "from": "$response.body#/number",
            "to": "$response.body#/number",
        },
    ),
    "FillAgain": ("ApiV1DocumentsDocumentIdFillFill", {"document_id": "$response.body#/document_id"}),
    "DeleteTheDocument": ("ApiV1DocumentsDocumentIdRemove", {"document_id": "$response.body#/document_id"}),
}
_AFTER_BATCH = {
    "ReadBatch": ("ApiV1BatchesBatchIdRead", {"batch_id": "$response.body#/id"}),
    "BatchResults": ("ApiV1BatchesBatchIdResultsResults", {"batch_id": "$response.body#/id"}),
    "CancelBatch": ("ApiV1BatchesBatchIdCancelCancel", {"batch_id": "$response.body#/id"}),
}
LINKS: dict[tuple[str, str], dict[str, tuple[str, dict[str, str]]]] = {
    ("ApiV1DocumentsCreate", "201"): _AFTER_DOCUMENT,
    ("ApiV1DocumentsDocumentIdRead", "200"): _AFTER_DOCUMENT,
    ("ApiV1DocumentsDocumentIdUpdate", "200"): _AFTER_DOCUMENT,
    ("ApiV1DocumentsDocumentIdReplace", "200"): _AFTER_DOCUMENT,
    ("ApiV1DocumentsDocumentIdFillFill", "201"): _AFTER_REVISION,
    ("ApiV1DocumentsDocumentIdRevisionsNumberSpansKeyRegenerateRegenerate", "201"): _AFTER_REVISION,
    ("ApiV1DocumentsDocumentIdRevisionsNumberSpansKeyChooseChoose", "201"): _AFTER_REVISION,
    ("ApiV1DocumentsDocumentIdRevisionsNumberRead", "200"): _AFTER_REVISION,
    ("ApiV1BatchesCreate", "202"): _AFTER_BATCH,
}


def _links(openapi: OpenAPI) -> None:
    operations = {
        operation.operation_id: operation
        for item in (openapi.paths or {}).values()
        for operation in (item.get, item.put, item.post, item.patch, item.delete)
        if operation is not None
    }
    for (source, status), links in LINKS.items():
        operation = operations.get(source)
        response = (operation.responses or {}).get(status) if operation is not None else None
        if response is None or not hasattr(response, "links"):
            continue
        response.links = {
            name: Link(operation_id=target, parameters=parameters)
            for name, (target, parameters) in links.items()
            if target in operations
        }


def refine(openapi: OpenAPI, *, max_steps: int | None = None) -> OpenAPI:
    """Make the generated document match the server's behaviour (see the module docstring)."""
    _integer_parameters(openapi)
    _header_parameters(openapi)
    _links(openapi)
    components = openapi.components
    schemas: dict[str, Any] = components.schemas or {}
    for name, model in _models().items():
        schema = schemas.get(name)
        if not isinstance(schema, Schema):
            continue
        _copy_constraints(model, schema)
        if model.model_config.get("extra") == "forbid":
            schema.additional_properties = False
    patch = schemas.get("DocumentPatch")
    if isinstance(patch, Schema) and patch.properties:
        for patch_field in patch.properties.values():
            _drop_null(patch_field)
        patch.min_properties = 1
    for name in [name for name, model in _models().items() if issubclass(model, SamplerOptions)]:
        options = schemas.get(name)  # SamplerOptions, and the /v1 API's EditorOptions
        if not (isinstance(options, Schema) and options.properties):
            continue
        steps = options.properties.get("steps")
        if isinstance(steps, Schema) and max_steps is not None:
            steps.maximum = max_steps  # the server's max_steps setting
        for field in ("temperature", "alg_temp"):
            prop = options.properties.get(field)
            if isinstance(prop, Schema):
                prop.any_of = [Schema(const=0), Schema(minimum=MIN_TEMPERATURE)]
        options.any_of = _reference_schedules()
    step_schema = StepEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in step_schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas["StepEvent"] = step_schema
    for operation, status in _streaming_operations(openapi):
        response = operation.responses[status]  # type: ignore[index]
        content = getattr(response, "content", None)
        if content is not None:
            json_body = content.get("application/json")
            content[SSE] = _event_stream(json_body.schema if json_body is not None else None)
    components.schemas = schemas
    return openapi


__all__ = ["OfflineSwagger", "refine"]
