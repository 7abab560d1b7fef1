"""Reading a ``POST /v1/train`` body: the examples file and the job's options, size-capped.

Two shapes:

- ``multipart/form-data``: a ``file`` part (CSV, TSV or JSONL, told apart by its file name) and
  one part per option (``name``, ``mode``, ``epochs``, ``rank``, ``max_length``, ``promote``);
- ``application/x-ndjson``: the body is the JSONL file itself; options come as query
  parameters, or as a first line ``{"options": {...}}`` (blanked before the rows are read, so
  row numbers stay line numbers of the body).

Nothing here trains or validates rows; that is the job manager's.
"""

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from registry import shown
from server.errors import INVALID_REQUEST, TOO_LARGE, ApiError, as_text
from server.schemas import decode_json, unknown_field
from training import TrainConfig

NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")
NDJSON_FILENAME = "upload.jsonl"  # how messages name the rows of a raw JSON lines body
OPTION_FIELDS = ("name", "mode", "epochs", "rank", "max_length", "weights_dtype", "promote")
_INT_OPTIONS = ("epochs", "rank", "max_length")
_STR_OPTIONS = ("mode", "weights_dtype")
_MAX_OPTION_BYTES = 1024
_CHUNK_BYTES = 64 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes  # the examples file, as sent
    filename: str  # its base name; the suffix says the format
    options: Mapping[str, Any]  # option name -> raw value (strings from forms and queries)


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """A validated job request."""

    name: str  # adapter name (checked by the registry's rules at submit)
    config: TrainConfig
    promote: bool  # the new version becomes the name's latest when the job succeeds


async def read_upload(request: web.Request, max_bytes: int) -> Upload:
    """The body's file and options; ApiError 413 past `max_bytes`, 415/422 for bad shapes."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise upload_too_large(max_bytes)  # refuse before reading a byte of it
    if request.content_type == "multipart/form-data":
        upload = await _read_multipart(request, max_bytes)
        return replace(upload, options=_merged(_query_options(request), upload.options, "a part"))
    if request.content_type in NDJSON_TYPES:
        return await _read_ndjson(request, max_bytes)
    raise ApiError(
        415,
        INVALID_REQUEST,
        f"unsupported Content-Type {request.content_type!r}: send multipart/form-data with a "
        "'file' part, or application/x-ndjson",
    )


def parse_options(options: Mapping[str, Any]) -> TrainRequest:
    """Check each option; ApiError 422 names the field at fault."""
    _check_known(options)
    name = options.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid("'name' is required: the model name the job trains", "name")
    overrides: dict[str, Any] = {}
    for field in _STR_OPTIONS:
        if field in options:
            if not isinstance(options[field], str):
                raise _invalid(f"'{field}' must be a string", field)
            overrides[field] = options[field]
    for field in _INT_OPTIONS:
        if field in options:
            overrides[field] = _as_int(options[field], field)
    try:
        config = TrainConfig(**overrides)
    except ValueError as exc:
        field = next((f for f in overrides if str(exc).startswith(f)), None)
        raise _invalid(str(exc), field) from None
    return TrainRequest(name, config, _as_bool(options.get("promote", True), "promote"))


async def _read_multipart(request: web.Request, max_bytes: int) -> Upload:
    try:
        return await _parse_multipart(request, max_bytes)
    # aiohttp's reader: no boundary, parts that do not start, a line past its limit
    except (ValueError, HttpProcessingError) as exc:
        message = f"malformed multipart body: {exc}"
        raise ApiError(400, INVALID_REQUEST, message, close=True) from None


def _check_known(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(OPTION_FIELDS))
    if unknown:
        raise _invalid(*unknown_field(unknown[0], OPTION_FIELDS, kind="option"))


async def _parse_multipart(request: web.Request, max_bytes: int) -> Upload:
    reader = await request.multipart()
    data: bytes | None = None
    filename = ""
    options: dict[str, str] = {}
    num_bytes = 0  # of every part: a chunked body has no Content-Length to refuse up front
    too_large = upload_too_large(max_bytes)
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _invalid("nested multipart bodies are not supported", None)
        if part.name == "file" and data is not None or part.name in options:
            # a second file or value would silently replace the first one sent
            raise _invalid(f"the {part.name!r} part is sent more than once", part.name)
        if part.name == "file":
            filename = _file_name(part)
            data = await _read_part(part, max_bytes - num_bytes, too_large)
            num_bytes += len(data)
        elif part.name in OPTION_FIELDS:
            limit = min(_MAX_OPTION_BYTES, max_bytes - num_bytes)  # the body's cap may bind
            too_long = _invalid(f"option {part.name!r} is too long", part.name)
            raw = await _read_part(
                part, limit, too_long if limit == _MAX_OPTION_BYTES else too_large
            )
            num_bytes += len(raw)
            options[part.name] = raw.decode("utf-8", errors="replace").strip()
        elif part.name:  # refused now, not after reading whatever follows
            _check_known([part.name])
        else:  # a part without a name: read, counted and dropped
            num_bytes += len(await _read_part(part, max_bytes - num_bytes, too_large))
    if data is None:
        raise _invalid("missing the 'file' part (CSV, TSV or JSONL with text and label)", "file")
    return Upload(data, filename, options)


async def _read_ndjson(request: web.Request, max_bytes: int) -> Upload:
    chunks: list[bytes] = []
    num_bytes = 0
    async for chunk in request.content.iter_chunked(_CHUNK_BYTES):
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise upload_too_large(max_bytes)
        chunks.append(chunk)
    data = b"".join(chunks)
    options = _query_options(request)
    first, newline, rest = data.partition(b"\n")
    header = _options_line(first.removeprefix(_UTF8_BOM))  # the rows' reader drops one too
    if header is not None:
        options = _merged(options, header, "the first line")
        data = newline + rest  # an empty first line: row numbers stay line numbers
    return Upload(data, NDJSON_FILENAME, options)


def _query_options(request: web.Request) -> dict[str, Any]:
    """Options sent as query parameters, which either body shape may carry."""
    options: dict[str, Any] = {}
    for key, value in request.query.items():
        if key in options:
            raise _invalid(f"the query parameter {shown(key)} is given more than once", _field(key))
        options[key] = value
    return options


def _merged(query: Mapping[str, Any], body: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The query's options and the body's together; one given in both is refused, as either
    would silently replace the other."""
    if both := sorted(set(query) & set(body)):
        message = f"option {shown(both[0])} is given both in the query and in {where}"
        raise _invalid(message, _field(both[0]))
    return {**query, **body}


def _options_line(line: bytes) -> dict[str, Any] | None:
    """The options of a first line ``{"options": {...}}``; None when it is a data row."""
    try:
        parsed = decode_json(line)
    except msgspec.DecodeError:
        return None
    if not isinstance(parsed, dict) or set(parsed) != {"options"}:
        return None
    if not isinstance(parsed["options"], dict):
        raise _invalid("the first line's 'options' must be an object", "options")
    if (twice := _key_given_twice(line)) is not None:  # JSON keeps only the last value
        raise _invalid(f"option {shown(twice)} is given twice in the first line", _field(twice))
    return parsed["options"]


def _key_given_twice(line: bytes) -> str | None:
    """A key that one object of ``line`` (a small, valid JSON line) holds twice, if any."""
    twice: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        twice.extend(key for key in keys if keys.count(key) > 1)
        return dict(items)

    json.loads(line, object_pairs_hook=pairs)
    return twice[0] if twice else None


async def _read_part(part: BodyPartReader, max_bytes: int, too_large: ApiError) -> bytes:
    chunks: list[bytes] = []
    num_bytes = 0
    while chunk := await part.read_chunk(_CHUNK_BYTES):
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _file_name(part: BodyPartReader) -> str:
    """The part's base name (never a path); from its content type when it has none."""
    if part.filename:  # into the job's record and every answer about it: text only
        return as_text(PurePath(part.filename.replace("\\", "/")).name) or "upload"
    content_type = part.headers.get("Content-Type", "")
    if content_type.startswith("text/csv"):
        return "upload.csv"
    if content_type.startswith(NDJSON_TYPES):
        return NDJSON_FILENAME
    raise _invalid("the 'file' part needs a file name ending in .csv, .tsv or .jsonl", "file")


def _as_int(value: Any, field: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if text.isascii() and text.isdigit():  # isdigit() alone takes "²", which int() refuses
        with contextlib.suppress(ValueError):  # over int()'s 4,300 digits
            return int(text)
    raise _invalid(f"{field!r} must be a positive integer, got {shown(value)}", field)


def _as_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _invalid(f"{field!r} must be true or false, got {shown(value)}", field)


def _field(name: str) -> str:
    """An option's name as an answer's ``field``: cut, as a key may be megabytes long."""
    return unknown_field(name)[1]


def _invalid(message: str, field: str | None) -> ApiError:
    return ApiError(422, INVALID_REQUEST, message, field=field)


def upload_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, TOO_LARGE, f"upload is larger than {max_bytes} bytes", field="file")
