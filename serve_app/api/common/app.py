"""The HTTP app of a set of API families: their routes, the OpenAPI document, and every
error answered in OpenAI's format (a trace only ever in the log). The ingress serves all
families; the fast adapter tests serve some, on fakes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve_app.api.common.http import openai_error
from serve_app.api.common.openapi import with_bodies
from serve_app.api.common.routes import Adapters, ApiFamily, mount
from serve_app.errors import APIError

log = logging.getLogger("serve_app.api")


def api_app(families: tuple[ApiFamily, ...], adapters: Adapters) -> FastAPI:
    app = FastAPI(title="Kimi K2.5 tiered serving", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return openai_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return openai_error(APIError(400, str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return openai_error(APIError(500, "internal error; the request was not served"))

    mount(app, families, adapters)
    app.openapi = with_bodies(app, families)  # type: ignore[method-assign]
    return app
