"""WebDataset tar shards as img2dataset writes them: members KEY.jpg|jpeg|png|webp, KEY.json and optional KEY.txt.

The shards are the root's `*.tar` files (not recursive), or `dataset.shards`, a brace pattern relative to the root
(`shards/{00000..00099}.tar`, `{a,b}.tar`). One shard is one part. A record is the run of adjacent members sharing
a key (the member name up to the first dot of its last component); `record_id` is `<shard without .tar>/<key>`.
Metadata: the JSON's top-level keys (a name the tool owns, such as img2dataset's `sha256` or `error`, gets the
prefix `source_`) and `caption`, from KEY.txt or else the JSON's `caption`. A nested value (an array or object) is
its JSON text, never dropped: `"opt_out": [true]` reaches the rules as the text `[true]`, which a boolean rule
refuses to read (exit 2), where dropping it would have left a null opt-out (datasets/streamed.py `rule_column`).
A key whose values differ in type between records is text (`true`, `"yes"` → `true`, `yes`), within a shard and
between shards (curation/records.py), never null.
The per-shard `.parquet` img2dataset writes beside each tar is not read (the JSON holds the same fields).

Shards are read with Python's tarfile from the file itself, in one pass; nothing is ever extracted to disk. The
metadata pass reads only the JSON and text members (tarfile seeks over image data). Every problem is an error row
for its record: a corrupt image, JSON that does not parse or that gives a key twice or two keys differing only in
case (which one holds would be a guess), a key without an image, a member that is a link or a
device, a member name that is absolute or climbs with `..`, a key repeated in the shard (the later one is named
`<shard>/<key>#2`), a tar truncated or damaged (records before the break are fine). A shard that is not a tar, is
missing, or is a symlink out of the root is one record named after the shard (`<shard without .tar>`).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from .base import Loaded, Part, open_regular, safe_join
from .streamed import RepeatedKey, StreamedReader, nested_text, rename_reserved, rows_table, unique_keys
from .transforms import load_bytes

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
TAIL_CHECK = 64 * 1024  # bytes after the last member checked to be the tar's zero padding
MAX_SHARDS = 1_000_000  # a brace pattern may name at most this many shards


def shard_paths(pattern: str) -> list[str]:
    """The relative paths a brace pattern names, in order: `{000..012}` (zero padding kept) and `{a,b,c}`.

    ValueError (the reason) for nested or unbalanced braces, a descending range, more than MAX_SHARDS names, and
    any name that is absolute, climbs with `..`, holds a backslash or NUL, or does not end with `.tar`.
    """
    names = _expand(pattern)
    for name in names:
        if "{" in name or "}" in name:
            raise ValueError("nested or unbalanced braces")
        path = PurePosixPath(name)
        if not name or "\0" in name or "\\" in name or path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
            raise ValueError(f"{name!r} is absolute or climbs with '..': shards must lie under dataset.root")
        if not name.endswith(".tar"):
            raise ValueError(f"{name!r} does not end with .tar")
    return names


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        low, high = int(span.group(1)), int(span.group(2))
        if high < low:
            raise ValueError(f"{{{body}}}: the range descends")
        if high - low >= MAX_SHARDS:
            raise ValueError(f"{{{body}}}: more than {MAX_SHARDS} shards")
        choices = [str(n).zfill(len(span.group(1))) for n in range(low, high + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"{{{body}}}: not a range {{a..b}} or a list {{a,b}}")
    rest = _expand(pattern[match.end():])
    if len(choices) * len(rest) > MAX_SHARDS:
        raise ValueError(f"more than {MAX_SHARDS} shards")
    head = pattern[: match.start()]
    return [head + choice + tail for choice in choices for tail in rest]


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset splits it: at the first dot of the last component."""
    while name.startswith("./"):  # `tar -cf s.tar .` writes ./KEY.jpg
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a FIFO"
    return "not a regular file"


@dataclass
class _Group:
    """The adjacent members of one key; `problem` is why the record cannot be read, if known from the headers."""

    key: str
    record_id: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    problem: str | None = None


class _ShardError(ImageDecodeError):
    """The whole shard cannot be read (missing, not a tar, outside the root)."""


class WebDatasetReader(StreamedReader):
    format = "webdataset"
    _stems: dict[str, Part] | None = None  # shard name without .tar -> its part (made on first use)

    def layout_hint(self) -> str:
        return ("expected *.tar shards directly in the root holding KEY.jpg|jpeg|png|webp, KEY.json and optional "
                "KEY.txt, or dataset.shards: a brace pattern such as shards/{00000..00099}.tar")

    def list_parts(self) -> list[Part]:
        self.require_root()
        if self.spec.shards:
            try:
                names = shard_paths(self.spec.shards)
            except ValueError as err:
                raise InputError(f"dataset.shards: {self.spec.shards!r}: {err}") from None
        else:
            names = sorted(entry.name for entry in os.scandir(self.root)
                           if entry.name.endswith(".tar") and (entry.is_symlink() or entry.is_file()))
        if not names:
            raise InputError(f"webdataset dataset: no *.tar shards in {self.root}", hint=self.layout_hint())
        return [Part(index, name, source=name) for index, name in enumerate(names)]

    def part_of(self, record_id: str, parts: list[Part]) -> Part | None:
        if self._stems is None:
            self._stems = {part.source.removesuffix(".tar"): part for part in parts}
        pieces = record_id.split("/")
        for length in range(len(pieces), 0, -1):  # the longest shard name the id starts with
            part = self._stems.get("/".join(pieces[:length]))
            if part is not None:
                return part
        return None

    # -- reading a shard --------------------------------------------------------------------------------------

    def _open(self, part: Part) -> BinaryIO:
        path = safe_join(self.root, part.source)  # a PathEscapeError names the shard
        return open_regular(path, f"shard {part.source}", _ShardError)

    def _walk(self, part: Part) -> Iterator[tuple[_Group, tarfile.TarFile]]:
        """The shard's records in order, each with the open tar to read its members from. Raises _ShardError (or
        PathEscapeError) before the first record if the shard cannot be read at all."""
        stem = part.source.removesuffix(".tar")
        with self._open(part) as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 (closed with `handle`, which it reads)
            except (tarfile.TarError, EOFError, OSError) as err:
                raise _ShardError(f"shard {part.source}: not a tar file ({err})") from None
            seen: dict[str, int] = {}
            current: _Group | None = None
            end = 0
            last = ""
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, EOFError, OSError) as err:
                    if current is not None:
                        current.problem = current.problem or f"the tar {part.source} is truncated or damaged here ({err})"
                        yield current, tar
                    return
                if info is None:
                    break
                # tarfile keeps every header it read in `members`: drop them (links are refused, never resolved)
                tar.members.clear()  # type: ignore[attr-defined]
                end = info.offset_data + (-(-info.size // BLOCK) * BLOCK if info.isreg() else 0)
                last = info.name
                if info.isdir():
                    continue
                key, ext = _split_name(info.name)
                if current is None or key != current.key or ext in current.members:
                    if current is not None:
                        yield current, tar
                    seen[key] = count = seen.get(key, 0) + 1
                    current = _Group(key, f"{stem}/{key}" if count == 1 else f"{stem}/{key}#{count}")
                    if count > 1:
                        current.problem = (f"key {key!r} appears again in {part.source} (a record's members must be "
                                           "adjacent, and keys unique in a shard)")
                current.members[ext] = info
                path = PurePosixPath(info.name)
                if path.is_absolute() or ".." in path.parts or "\0" in info.name:
                    current.problem = current.problem or f"member {info.name!r} is absolute or climbs with '..' (refused)"
                elif not info.isreg():
                    current.problem = current.problem or f"member {info.name!r} is {_kind(info)} (refused)"
            if current is not None:
                if size > end and self._damaged_tail(handle, end, size):
                    current.problem = current.problem or f"the tar {part.source} is truncated or damaged after {last!r}"
                yield current, tar

    @staticmethod
    def _damaged_tail(handle: BinaryIO, end: int, size: int) -> bool:
        """Whether the bytes after the last member are not the tar's zero padding (a cut or corrupt header)."""
        handle.seek(end)
        return any(handle.read(min(size - end, TAIL_CHECK)))

    def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
        if info.size > self.spec.max_file_bytes:
            raise ImageDecodeError(f"member {info.name}: {info.size} bytes, above the budget dataset.max_file_bytes = "
                                   f"{self.spec.max_file_bytes}")
        try:
            source = tar.extractfile(info)
            data = source.read() if source is not None else b""
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ImageDecodeError(f"member {info.name}: cannot read it, the tar is truncated or damaged ({err})") from None
        if len(data) != info.size:
            raise ImageDecodeError(f"member {info.name}: the tar is truncated")
        return data

    def _json(self, tar: tarfile.TarFile, group: _Group) -> dict[str, object]:
        info = group.members.get("json")
        if info is None:
            return {}
        try:
            value = json.loads(self._member(tar, info), object_pairs_hook=unique_keys)
        except RepeatedKey as err:
            raise ImageDecodeError(f"member {info.name}: key {err} appears twice (which one holds?)") from None
        except (ValueError, RecursionError) as err:
            raise ImageDecodeError(f"member {info.name}: not valid JSON ({str(err)[:80]})") from None
        if not isinstance(value, dict):
            raise ImageDecodeError(f"member {info.name}: not a JSON object")
        return value

    def _caption(self, tar: tarfile.TarFile, group: _Group) -> str | None:
        info = group.members.get("txt")
        if info is None:
            return None
        try:
            return self._member(tar, info).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ImageDecodeError(f"member {info.name}: not UTF-8 text") from None

    def _fields(self, tar: tarfile.TarFile, group: _Group) -> dict[str, object]:
        """The record's metadata: the JSON's top-level keys (renamed if they clash; nested values as JSON text) and
        `caption`."""
        values = {name: nested_text(value) if isinstance(value, dict | list) else value
                  for name, value in self._json(tar, group).items()}
        row: dict[str, object] = {}
        folded: set[str] = set()
        for name, value in values.items():
            if not name:
                continue
            column = rename_reserved(name)
            if column.lower() == "caption":  # from KEY.txt, else the JSON's caption (below)
                continue
            if column.lower() in folded:  # names are compared without case, like SQL: neither may silently win
                other = next(c for c in row if c.lower() == column.lower())
                raise ImageDecodeError(f"member {group.members['json'].name}: keys {other!r} and {column!r} differ "
                                       "only in case")
            folded.add(column.lower())
            row[column] = value
        caption = self._caption(tar, group)
        if caption is None:
            found = next((v for k, v in values.items() if k.lower() == "caption" and v is not None), None)
            caption = found if found is None or isinstance(found, str) else json.dumps(found)
        row["caption"] = caption
        return row

    def part_metadata(self, part: Part) -> pa.Table:
        ids: list[str] = []
        rows: list[dict[str, object]] = []
        try:
            for group, tar in self._walk(part):
                ids.append(group.record_id)
                try:
                    rows.append({} if group.problem else self._fields(tar, group))
                except ImageDecodeError:
                    rows.append({})  # read_part gives the reason
        except ImageDecodeError:
            if not ids:
                return rows_table([part.source.removesuffix(".tar")], [{}])
        return rows_table(ids, rows)

    def _pixels(self, tar: tarfile.TarFile, group: _Group) -> np.ndarray:
        if group.problem:
            raise ImageDecodeError(group.problem)
        images = [group.members[ext] for ext in IMAGE_EXTENSIONS if ext in group.members]
        if not images:
            raise ImageDecodeError(f"key {group.key}: no image member ({', '.join(IMAGE_EXTENSIONS)})")
        if len(images) > 1:
            raise ImageDecodeError(f"key {group.key}: more than one image member")
        self._fields(tar, group)  # a JSON or caption that cannot be read makes the record an error too
        data = self._member(tar, images[0])
        return load_bytes(data, images[0].name, self.spec.resolution, max_pixels=self.spec.max_pixels)

    def read_part(self, part: Part, record_ids: Sequence[str]) -> Iterator[Loaded]:
        wanted = set(record_ids)
        done: set[str] = set()
        try:
            for group, tar in self._walk(part):
                if group.record_id in wanted and group.record_id not in done:
                    done.add(group.record_id)
                    try:
                        yield group.record_id, self._pixels(tar, group)
                    except ImageDecodeError as err:
                        yield group.record_id, err
                    if len(done) == len(wanted):
                        return
        except ImageDecodeError as err:  # the shard cannot be read: its records (the shard's own name) get why
            for record_id in record_ids:
                if record_id not in done:
                    done.add(record_id)
                    yield record_id, err
        for record_id in record_ids:
            if record_id not in done:
                done.add(record_id)
                yield record_id, ImageDecodeError(f"{record_id}: not in shard {part.source} (did it change since it "
                                                  "was listed?)")
