"""The wire format: request validation with exact field paths, and the JSON we answer with.

Validation is written out by hand rather than left to a schema library so that each error
names the one field at fault in the API's own notation (``model``, ``input[3]``, ``stream``).
"""

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from engine import Job, ModelPrediction, MultiJob, MultiPrediction, Prediction
from registry import shown

NDJSON = "application/x-ndjson"

_CLASSIFY_FIELDS = ("model", "models", "input", "stream", "truncate", "timeout")
_SHOWN_FIELD = 80  # characters of an unknown field's name in the answer
_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


class RequestInvalid(ValueError):
    """The body parsed but does not fit the schema; ``field`` is where (None: the whole body)."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class ClassifyRequest:
    """A validated ``POST /v1/classify`` body: exactly one of ``model`` and ``models`` is set."""

    model: str | None  # "name", "name@3" or "tenant/name[@3]", resolved by the engine
    models: tuple[str, ...] | None  # several such names: every one answers every input
    texts: tuple[str, ...]  # at least one, none blank
    is_batch: bool  # "input" was a list (fields are "input[i]") rather than one string
    stream: bool  # answer NDJSON, one line per input as it completes
    truncate: bool  # cut over-long texts instead of refusing them
    timeout_s: float | None  # seconds the inputs may wait to start (capped by the server)


def decode_json(body: bytes) -> Any:
    """Parse a request body; raises ``msgspec.DecodeError`` on malformed JSON, bad UTF-8 or
    nesting too deep to decode (msgspec raises the last two as other exceptions)."""
    try:
        return msgspec.json.decode(body)
    except msgspec.ValidationError:  # msgspec's words: "Number out of range - at `$[...]`"
        raise msgspec.DecodeError(
            "a number is out of range: JSON numbers here must fit a 64-bit float, and "
            "integers 4,300 digits"
        ) from None
    except msgspec.DecodeError as exc:
        if str(exc) == "Input data was truncated" and _is_complete_json(body):
            # msgspec's words for a string ending in half a surrogate pair ("\ud83d")
            raise msgspec.DecodeError(
                "JSON is malformed: a string ends in half a UTF-16 surrogate pair "
                "(\\ud800-\\udbff with no low half), which is not text"
            ) from None
        raise
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise msgspec.DecodeError("arrays or objects nested too deeply") from None


def _is_complete_json(body: bytes) -> bool:
    try:
        json.loads(body)  # the stdlib takes lone surrogates where msgspec does not
    except (ValueError, RecursionError):
        return False
    return True


def unknown_field(name: str, known: Iterable[str] = (), kind: str = "field") -> tuple[str, str]:
    """(message, field) for a body's unknown key, both cut to a readable length: the answer
    echoes it, and a key may be megabytes long."""
    accepted = f"; accepted {kind}s: {', '.join(known)}" if known else ""
    field = name if len(name) <= _SHOWN_FIELD else f"{name[:_SHOWN_FIELD]}..."
    return f"unknown {kind} {shown(name)}{accepted}", field


def parse_classify(payload: Any) -> ClassifyRequest:
    """Check a decoded body field by field; raises RequestInvalid naming the first bad field."""
    if not isinstance(payload, dict):
        raise RequestInvalid(f"request body must be a JSON object, got {_json_type(payload)}", None)
    unknown = sorted(key for key in payload if key not in _CLASSIFY_FIELDS)
    if unknown:
        raise RequestInvalid(*unknown_field(unknown[0], _CLASSIFY_FIELDS))
    model, models = _parse_models(payload)
    texts, is_batch = _parse_input(_required(payload, "input"))
    return ClassifyRequest(
        model=model,
        models=models,
        texts=texts,
        is_batch=is_batch,
        stream=_optional_bool(payload, "stream", default=False),
        truncate=_optional_bool(payload, "truncate", default=True),
        timeout_s=_optional_timeout(payload),
    )


def _parse_models(payload: dict[str, Any]) -> tuple[str | None, tuple[str, ...] | None]:
    """``model`` (one name) or ``models`` (a list of names), never both. How many and which
    repeat is the engine's to check: it knows its limit and how names resolve."""
    if "model" in payload and "models" in payload:
        raise RequestInvalid("give either 'model' or 'models', not both", "models")
    if "models" not in payload:
        model = _required(payload, "model")
        if not isinstance(model, str) or not model.strip():
            raise RequestInvalid(_expected("model", "a non-empty string", model), "model")
        return model, None
    models = payload["models"]
    if not isinstance(models, list):
        raise RequestInvalid(_expected("models", "a list of model names", models), "models")
    if not models:
        raise RequestInvalid("models is an empty list: give at least one model", "models")
    for index, name in enumerate(models):
        field = f"models[{index}]"
        if not isinstance(name, str) or not name.strip():
            raise RequestInvalid(_expected(field, "a non-empty string", name), field)
    return None, tuple(models)


def _optional_timeout(payload: dict[str, Any]) -> float | None:
    value = payload.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise RequestInvalid(_expected("timeout", "a positive number of seconds", value), "timeout")
    # an int of 400 digits has no float; the server's max_timeout_s caps it later anyway
    return float(min(value, sys.float_info.max))


def _parse_input(value: Any) -> tuple[tuple[str, ...], bool]:
    if isinstance(value, str):
        _check_text(value, "input")
        return (value,), False
    if not isinstance(value, list):
        raise RequestInvalid(_expected("input", "a string or a list of strings", value), "input")
    if not value:
        raise RequestInvalid("input is an empty list: give at least one text", "input")
    for index, text in enumerate(value):
        field = f"input[{index}]"
        if not isinstance(text, str):
            raise RequestInvalid(_expected(field, "a string", text), field)
        _check_text(text, field)
    return tuple(value), True


def _check_text(text: str, field: str) -> None:
    if not text.strip():
        raise RequestInvalid(f"{field} is empty: texts must contain non-whitespace", field)


def _required(payload: dict[str, Any], field: str) -> Any:
    if field not in payload:
        raise RequestInvalid(f"missing required field {field!r}", field)
    return payload[field]


def _optional_bool(payload: dict[str, Any], field: str, *, default: bool) -> bool:
    value = payload.get(field, default)
    if not isinstance(value, bool):
        raise RequestInvalid(_expected(field, "true or false", value), field)
    return value


def _expected(field: str, expected: str, got: Any) -> str:
    """What the field must be and what came: a number by its value ("got number" for -0.0
    left the reader guessing), anything else by its JSON type."""
    shown_value = isinstance(got, float) or (type(got) is int and abs(got) < 10**18)
    return f"{field} must be {expected}, got {repr(got) if shown_value else _json_type(got)}"


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# answers ---------------------------------------------------------------------------------


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def ndjson_line(obj: Any) -> bytes:
    return msgspec.json.encode(obj) + b"\n"


def json_response(
    obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encode(obj), status=status, headers=headers, content_type="application/json"
    )


def prediction_json(prediction: Prediction) -> dict[str, Any]:
    return {
        "index": prediction.index,
        "label": prediction.label,
        "scores": dict(prediction.scores),
        "truncated": prediction.truncated,
        "tokens": prediction.num_tokens,
    }


def usage_json(num_inputs: int, num_tokens: int) -> dict[str, int]:
    return {"inputs": num_inputs, "tokens": num_tokens}


def classify_json(job: Job, predictions: Iterable[Prediction]) -> dict[str, Any]:
    data = [prediction_json(p) for p in predictions]
    return {
        "model": job.model,
        "version": job.version,
        "data": data,
        "usage": usage_json(len(data), sum(item["tokens"] for item in data)),
    }


def stream_summary_json(job: Job, num_tokens: int) -> dict[str, Any]:
    """The last line of a complete stream: its presence tells the client nothing was lost."""
    return {
        "done": True,
        "model": job.model,
        "version": job.version,
        "usage": usage_json(job.num_inputs, num_tokens),
    }


# answers to a "models" request: the single-model shape, with a "results" list per input
# (one entry per requested model, in request order) where one label stood


def model_prediction_json(result: ModelPrediction) -> dict[str, Any]:
    return {
        "model": result.model,
        "version": result.version,
        "label": result.label,
        "scores": dict(result.scores),
    }


def multi_prediction_json(prediction: MultiPrediction) -> dict[str, Any]:
    return {
        "index": prediction.index,
        "results": [model_prediction_json(r) for r in prediction.results],
        "truncated": prediction.truncated,
        "tokens": prediction.num_tokens,
    }


def models_json(job: MultiJob) -> list[dict[str, Any]]:
    return [{"model": m.model, "version": m.version} for m in job.models]


def classify_many_json(job: MultiJob, predictions: Iterable[MultiPrediction]) -> dict[str, Any]:
    data = [multi_prediction_json(p) for p in predictions]
    return {
        "models": models_json(job),
        "data": data,
        "usage": usage_json(len(data), sum(item["tokens"] for item in data)),
    }


def stream_many_summary_json(job: MultiJob, num_tokens: int) -> dict[str, Any]:
    return {
        "done": True,
        "models": models_json(job),
        "usage": usage_json(job.num_inputs, num_tokens),
    }


@dataclass(frozen=True, slots=True)
class AnswerFormat:
    """How one kind of request is answered: the whole body, a stream line, the stream's end."""

    body: Callable[[Any, list[Any]], dict[str, Any]]  # (job, predictions) -> JSON object
    item: Callable[[Any], dict[str, Any]]  # one prediction -> one NDJSON line
    summary: Callable[[Any, int], dict[str, Any]]  # (job, tokens seen) -> the last line


SINGLE_MODEL = AnswerFormat(classify_json, prediction_json, stream_summary_json)
MULTI_MODEL = AnswerFormat(classify_many_json, multi_prediction_json, stream_many_summary_json)
