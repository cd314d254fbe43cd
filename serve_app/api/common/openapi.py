"""The app's OpenAPI document, with the request bodies its routes validate.

The routes read the raw body themselves (size limit first, then JSON, then the pydantic
model), so FastAPI cannot see their body models; this puts each model's JSON schema in the
document, where SDK generators and the schemathesis fuzz tests read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serve_app.api.common.routes import ApiFamily
from serve_app.errors import ErrorResponse

REF = "#/components/schemas/{model}"


def with_bodies(app: FastAPI, families: tuple[ApiFamily, ...]) -> Callable[[], dict[str, Any]]:
    """An `app.openapi` replacement: FastAPI's document, plus each route's JSON request
    body and path parameters, OpenAI's error object as every route's non-2xx answer (or
    its family's own error shape), and a bearer-token security scheme."""
    bodies = {(r.path, r.method.lower()): r.body for f in families for r in f.routes if r.body}
    errors = {r.path: f.error for f in families if f.error for r in f.routes}

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = completed(doc, bodies, errors)
        return app.openapi_schema

    return openapi


def completed(
    doc: dict[str, Any],
    bodies: dict[tuple[str, str], type[BaseModel]],
    error_shapes: dict[str, type[BaseModel]],
) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for (path, method), model in bodies.items():
        doc["paths"][path][method]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": add_schema(schemas, model)}},
        }
    # FastAPI's own 422 never happens: validation errors are 400s in the API's format
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    # An API key is optional where the config names an anonymous plan; the admin
    # routes always need the admin token.
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    doc["security"] = [{"bearer": []}, {}]
    for path, operations in doc["paths"].items():
        error = error_shapes.get(path, ErrorResponse)
        for operation in operations.values():
            add_path_parameters(path, operation)
            operation["responses"].pop("422", None)
            operation["responses"]["default"] = {
                "description": "An error, in the API's own format",
                "content": {"application/json": {"schema": add_schema(schemas, error)}},
            }
            if path.startswith("/admin/"):
                operation["security"] = [{"bearer": []}]
    return doc


def add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    """Put `model`'s schema and those it refers to in `schemas`; return a reference."""
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def add_path_parameters(path: str, operation: dict[str, Any]) -> None:
    """The `{name}` parts of `path` as the operation's required string parameters (the
    endpoints read them from the request, so FastAPI does not list them)."""
    listed = {p["name"] for p in operation.get("parameters", ()) if p.get("in") == "path"}
    for name in re.findall(r"{(\w+)}", path):
        if name not in listed:
            operation.setdefault("parameters", []).append(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            )
