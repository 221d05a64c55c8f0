"""Typed configs loaded from YAML; every problem is reported with the file, the key path and the value."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from .errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


# Policies, pipelines and audit configs are a few KiB; a file above this is refused before it is parsed
# (and read no further than one byte past it, so a huge file or an endless stream cannot fill the memory).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64  # nested mappings/lists; PyYAML composes recursively, deeper input would overflow the stack


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with floats like 1e-3 (no dot) read as numbers, as people write learning rates.

    Anchors and aliases (`&name`, `*name`, `<<: *name`) are refused: an alias repeats a node by reference,
    so a few lines can stand for billions of values ("billion laughs") once anything walks the result,
    and no config of this tool needs them. Nesting deeper than MAX_YAML_DEPTH is refused too.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in types-PyYAML
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed; write the values out",
                event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are refused, types are not coerced, values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping at its top level (UTF-8, at most MAX_YAML_BYTES, no aliases)."""
    from .fileio import read_regular

    try:
        data = read_regular(path, MAX_YAML_BYTES)  # a FIFO or a device is refused, never waited on
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // (1 << 20)} MiB; refused unparsed "
                          "(a policy, pipeline or audit config is a few KiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})",
                          hint="save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def key_path(loc: tuple[int | str, ...]) -> str:
    """('rules', 0, 'sample', 'fraction') -> 'rules[0].sample.fraction'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the section that holds `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def describe_error(model: type[BaseModel], error: ErrorDetails) -> str:
    """One readable line for one pydantic error."""
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    where = key_path(loc)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{where}: unknown key{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {message} (got {error.get('input')!r})"


def validate_mapping(model: type[ModelT], data: dict[str, Any], *, source: str) -> ModelT:
    """Validate `data` against `model`; all problems are collected, the first is the message.

    Unknown keys come first: a misspelt key (noise.sigm) also leaves the key it meant missing, and the misspelling,
    with its 'did you mean', is what to fix."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")  # stable: file order kept
        problems = [describe_error(model, e) for e in errors]
        hint = None
        if len(problems) > 1:
            hint = f"{len(problems) - 1} more problem(s): " + "; ".join(problems[1:4])
        raise ConfigError(f"{source}: {problems[0]}", hint=hint) from None


def load_config(model: type[ModelT], path: Path) -> ModelT:
    """Load and validate a YAML config file."""
    return validate_mapping(model, read_yaml_mapping(path), source=str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted 'a.b' (sections are created as needed)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_scalar(text: str) -> Any:
    """A command-line value read as YAML (so 2e-4, true, [1, 2] mean what they say)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return text


def dump_yaml(model: BaseModel) -> str:
    """The resolved config as YAML, for saving next to an artifact."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)
