"""Routes that change the caller's models: move a name's latest pointer, delete versions.

``POST /v1/adapters/{name}/promote`` (``{"version": N}``) and ``.../rollback`` move the pointer
(``{name}`` may be the caller's ``acme/spam``, as classify names it),
as ``graft adapters promote`` / ``rollback`` do. ``DELETE /v1/adapters/{name}`` deletes a whole
name, ``DELETE /v1/adapters/{name}@{version}`` one version. Each is one registry call on a
thread; the registry's errors become 404 (names are the caller's own, so a message may say
what they lack) and 409.
"""

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from registry import InvalidName, NotFound, VersionInUse
from server.errors import CONFLICT, INVALID_JSON, INVALID_REQUEST, NOT_FOUND, ApiError
from server.routes import ENGINE, authenticate, own_model_ref
from server.schemas import decode_json, json_response, unknown_field

T = TypeVar("T")


def add_adapter_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.post("/v1/adapters/{name}/promote", promote),
            web.post("/v1/adapters/{tenant}/{name}/promote", promote),
            web.post("/v1/adapters/{name}/rollback", rollback),
            web.post("/v1/adapters/{tenant}/{name}/rollback", rollback),
            web.delete("/v1/adapters/{name}", delete),
            web.delete("/v1/adapters/{tenant}/{name}", delete),  # as "acme/spam" in classify
        ]
    )


async def promote(request: web.Request) -> web.Response:
    """``{"version": N}``: make version N the one the caller's model name serves."""
    engine = request.app[ENGINE]
    tenant = authenticate(request, engine)
    name = _own_name(request, tenant)
    version = _version_field(await request.read())
    call = functools.partial(engine.registry.promote, tenant, name, version)
    record = await _registry_call(call, name)
    return json_response({"model": record.full_name, "version": record.version, "latest": True})


async def rollback(request: web.Request) -> web.Response:
    """Serve the version promoted before the current one again."""
    engine = request.app[ENGINE]
    tenant = authenticate(request, engine)
    name = _own_name(request, tenant)
    _no_fields(await request.read())
    left, record = await _registry_call(
        functools.partial(engine.registry.rollback, tenant, name), name
    )
    body = {"model": record.full_name, "version": record.version, "previous": left}
    return json_response(body)


def _own_name(request: web.Request, tenant: str) -> str:
    """The route's model name, bare (``spam``) or the caller's full one (``acme/spam``), as
    classify and DELETE take it; a version (``spam@3``) or another tenant's is a 404."""
    ref, not_found = own_model_ref(request, tenant)
    if ref.version is not None:
        raise not_found
    return ref.name


async def delete(request: web.Request) -> web.Response:
    """Delete one version of the caller's model (``spam@3``) or all of it (``spam``); another
    tenant's model is as absent as a missing one."""
    engine = request.app[ENGINE]
    tenant = authenticate(request, engine)
    ref, _ = own_model_ref(request, tenant)
    _no_fields(await request.read())
    call = functools.partial(engine.registry.delete, tenant, ref.name, ref.version)
    records = await _registry_call(call, ref.name)
    engine.forget(records)  # their weights out of this server's memory too
    body = {"model": f"{tenant}/{ref.name}", "deleted": [record.version for record in records]}
    return json_response(body)


def _no_fields(raw: bytes) -> None:
    """Rollback and delete take no body, or ``{}``: a client that sent a version meant
    something else (promote, or a pinned name), and must not act on another version."""
    if not raw.strip():
        return
    body = _json_body(raw)
    if not isinstance(body, dict):
        raise ApiError(422, INVALID_REQUEST, "the body, if any, must be a JSON object")
    if body:
        field = sorted(body)[0]
        message, field = unknown_field(field)
        raise ApiError(422, INVALID_REQUEST, message, field=field)


def _json_body(raw: bytes) -> Any:
    try:
        return decode_json(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, INVALID_JSON, f"request body is not valid JSON: {exc}") from None


def _version_field(raw: bytes) -> int:
    body = _json_body(raw)
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ApiError(
            422, INVALID_REQUEST, "'version' must be a positive integer", field="version"
        )
    if set(body) != {"version"}:
        field = sorted(set(body) - {"version"})[0]
        message, field = unknown_field(field)
        raise ApiError(422, INVALID_REQUEST, message, field=field)
    return version


async def _registry_call(call: Callable[[], T], name: str) -> T:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, call)
    except InvalidName as exc:
        raise ApiError(404, NOT_FOUND, f"model {name!r} not found ({exc})") from None
    except NotFound as exc:  # the message names only the caller's own tenant and versions
        raise ApiError(404, NOT_FOUND, str(exc)) from None
    except VersionInUse as exc:
        raise ApiError(409, CONFLICT, str(exc)) from None
