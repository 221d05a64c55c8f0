"""The common ground of every contract file: a strict, frozen pydantic model, one JSON reader that turns any
fault into one line naming the file and the key, and one writer with the tool's JSON layout.

Contracts accept keys they do not declare (`extra="allow"`): a file written by an earlier or later version
keeps its other keys, and the writer writes back exactly the keys it was given (`exclude_unset`), so a
contract written from a dict has the bytes `json.dumps(payload, indent=2, sort_keys=True) + "\\n"` of that dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from ..errors import GuardError, InputError

MAX_JSON_BYTES = 64 * 2**20  # a card lists every shard; anything larger is refused unparsed
ModelT = TypeVar("ModelT", bound=BaseModel)


class Contract(BaseModel):
    """Base of the file contracts: types are not coerced, values are frozen, unknown keys are kept."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


def key_of(loc: tuple[int | str, ...]) -> str:
    """('counts', 'clean') -> 'counts.clean'; ('image_shape', 0) -> 'image_shape[0]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def problem(error: ErrorDetails) -> str:
    """`key: what is wrong (got value)` for one pydantic error, on one line."""
    key = key_of(tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{key}: {message} (got {shown})"


def validate(model: type[ModelT], payload: Any, *, source: str, error: type[GuardError] = InputError,
             hint: str | None = None) -> ModelT:
    """`payload` as a `model`, or `error` with one line `source: key: problem` (the first of them)."""
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        raise error(f"{source}: {problem(err.errors()[0])}", hint=hint) from None


def load_json(path: Path, *, error: type[GuardError] = InputError, hint: str | None = None,
              limit: int = MAX_JSON_BYTES, label: str | None = None) -> dict[str, Any]:
    """A JSON file that must hold an object (UTF-8, at most `limit` bytes); any fault is `error` naming it (as
    `label`, default the path)."""
    from ..fileio import read_regular

    name = label or str(path)
    try:
        data = read_regular(path, limit)  # a FIFO or a device is refused, never waited on
    except FileNotFoundError:
        raise error(f"{name}: missing", hint=hint) from None
    except OSError as err:
        raise error(f"{name}: cannot read: {err.strerror or err}", hint=hint) from None
    if len(data) > limit:
        raise error(f"{name}: larger than {limit >> 20} MiB; refused unparsed", hint=hint)
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{name}: not valid JSON ({err})", hint=hint) from None
    if not isinstance(payload, dict):
        raise error(f"{name}: expected a JSON object, got {type(payload).__name__}", hint=hint)
    return payload


def read_contract(model: type[ModelT], path: Path, *, error: type[GuardError] = InputError,
                  hint: str | None = None) -> ModelT:
    """Read and validate the contract file `path`."""
    return validate(model, load_json(path, error=error, hint=hint), source=str(path), error=error, hint=hint)


def dump(contract: BaseModel) -> dict[str, Any]:
    """The keys a contract was given, as JSON values (what the writer writes)."""
    return contract.model_dump(mode="json", exclude_unset=True, by_alias=True)


def write_contract(path: Path, contract: BaseModel) -> None:
    """Write `contract` atomically as sorted, 2-space indented JSON with a final newline."""
    from ..fileio import atomic_write_json

    atomic_write_json(path, dump(contract))
