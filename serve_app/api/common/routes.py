"""Routes as data: each API family exports one `ApiFamily` (its adapter class and its
routes), which the ingress registers and the OpenAPI document reads, so a path is
written once."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str
    # the adapter's handler: (adapter, request, **path parameters) -> the answer (or its
    # awaitable), usually the adapter class's own method
    call: Callable[..., Any]
    body: type[BaseModel] | None = None  # the JSON body it validates, for the document
    status_code: int = 200
    in_schema: bool = True


@dataclass(frozen=True)
class ApiFamily:
    adapter: type  # the class whose instance (the ingress's) each route's `call` is given
    routes: tuple[ApiRoute, ...]
    error: type[BaseModel] | None = None  # its own error shape, where not OpenAI's


def post(path: str, call: Callable[..., Any], **kw: Any) -> ApiRoute:
    return ApiRoute("POST", path, call, **kw)


def get(path: str, call: Callable[..., Any], **kw: Any) -> ApiRoute:
    return ApiRoute("GET", path, call, **kw)


def delete(path: str, call: Callable[..., Any], **kw: Any) -> ApiRoute:
    return ApiRoute("DELETE", path, call, **kw)


Adapters = Callable[[], dict[type, Any]]  # the adapters answering now, by class


def endpoint(adapter: type, route: ApiRoute, adapters: Adapters) -> Callable[[Request], Any]:
    """The route's FastAPI endpoint: the adapter of that class answers it."""

    async def answer(request: Request) -> Any:
        result = route.call(adapters()[adapter], request, **request.path_params)
        return await result if inspect.isawaitable(result) else result

    return answer


def operation_name(route: ApiRoute) -> str:
    name = route.call.__name__
    return name if name != "<lambda>" else route.path.strip("/").replace("/", "_")


def mount(app: FastAPI, families: tuple[ApiFamily, ...], adapters: Adapters) -> None:
    """Every family's routes on `app`, answered by `adapters()`."""
    for family in families:
        for route in family.routes:
            app.add_api_route(
                route.path,
                endpoint(family.adapter, route, adapters),
                methods=[route.method],
                name=operation_name(route),
                status_code=route.status_code,
                include_in_schema=route.in_schema,
            )
