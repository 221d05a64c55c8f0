"""Policy rules → one decision per record.

Exclude rules apply first, whatever their position, so an opt-out can never be overridden. Each
remaining record goes to the first clean/protect rule, in file order, that matches it among the
records still undecided when that rule is reached. `sample` keeps a deterministic subset of what a
rule matches (units chosen by hash, so the choice does not depend on file order or worker count);
matched records that are not kept fall through to later rules.

A rule's `where` comes from a policy file, which is hostile until checked: it is one boolean
expression over the `records` table and may read files of the policy's own folder, nothing else.
`RuleEvaluator` enforces that in three steps, all before any rule runs:

1. Parse. The expression is put in `SELECT _guard_row FROM records WHERE (<expression>)`;
   DuckDB's parser must find exactly one SELECT statement whose parse tree (`json_serialize_sql`) is
   the wrapper's own with only the WHERE clause filled in, so the expression cannot close the
   parenthesis to add statements (`; COPY ... TO`, ATTACH, INSTALL, LOAD, SET, PRAGMA, ...) or
   clauses (UNION, GROUP BY, ORDER BY). The whole tree is then walked against allow-lists: a table may
   be `records`, a VALUES list, `range`/`generate_series`/`unnest`, or a file reader (`read_csv`,
   `read_csv_auto`, `read_parquet`, `read_json`, `read_json_auto`) whose first argument is a plain
   string naming a data file inside the policy's folder (relative, no `..`, no glob, no URL, no
   dot-file or dot-folder, a suffix of its format such as .csv or .parquet, and still inside once
   symlinks are resolved); joins, subqueries and set operations of those. Every other
   table function (`read_text`, `read_blob`, `glob`, `query`, `duckdb_*`, ...), a quoted file name
   used as a table (a replacement scan), a qualified or unknown table, WITH, PIVOT, SHOW/SUMMARIZE
   and functions that reach the engine (`current_setting`, `write_log`, the JSON SQL (de)serialisers,
   ...) are refused: ConfigError naming the policy file, `rules[i].where` and what was refused.
2. Pre-read. A file whose column names repeat (also without case: `opt_out` and `OPT_OUT`) is refused, naming
   it: DuckDB would silently rename the second (`opt_out_1`) and the rule would read only one of them. Each file
   is read by a throwaway connection that can open that one resolved path and
   nothing else (`allowed_paths` = [the path], then `enable_external_access = false`,
   `lock_configuration = true`), and its rows are registered as an Arrow table under an internal
   name. The reader call in the parse tree is replaced by that table, and DuckDB turns the tree back
   into SQL (`json_deserialize_sql`): what runs is the checked tree, never the policy's raw text.
3. Run. The evaluation connection starts with extension auto-install and auto-load and Python
   replacement scans off; once `records` and the files are registered it sets
   `enable_external_access = false` (no file, directory, network, ATTACH, COPY, EXPORT, INSTALL,
   LOAD or secret storage at all) and `lock_configuration = true` (no SET or PRAGMA can undo it).

Why not DuckDB's `allowed_directories` with the policy's folder: in DuckDB 2.0 an allowed directory
is also writable (COPY ... TO, ATTACH and EXPORT DATABASE succeed inside it, so a payload could
rewrite the opt-out list), relative names found through `file_search_path` are not matched, and the
prefix test does not see symlinks. Reading the few small files first and then running with every
external access off is simpler and strictly narrower; the dataset root is not needed by any rule.

What remains by design: a file of the policy's folder can decide which records are clean or protected
(that is what an opt-out list is for), so a policy should live in a folder of its own, not in a home
or download folder next to unrelated files.

Errors quote the policy's expression, never data: a DuckDB error is passed on only when it is a
parser, binder or catalog error of an expression that reads no file (those name columns and types);
any other error (a conversion error prints the value it failed on; a binder error over a CSV may list
its first line as column names) is replaced by a message naming the rule, the expression and the kind
of error.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, InputError
from ..hashing import unit_rank
from .model import Rule, SampleSpec


@dataclass(frozen=True)
class Decisions:
    """Per record (in metadata order): the deciding rule, as an index into the policy's rules (-1: undecided).

    One int32 per record, so a decision table of millions of records stays small."""

    names: list[str]  # the policy's rule names, by index
    rule_actions: list[str]  # the policy's rule actions, by index
    chosen: np.ndarray  # int32 per record

    def rules_of(self, start: int = 0, stop: int | None = None) -> list[str | None]:
        """The deciding rule's name per record of rows [start, stop)."""
        return [self.names[i] if i >= 0 else None for i in self.chosen[start:stop].tolist()]

    def actions_of(self, start: int = 0, stop: int | None = None) -> list[str | None]:
        """The deciding rule's action per record of rows [start, stop)."""
        return [self.rule_actions[i] if i >= 0 else None for i in self.chosen[start:stop].tolist()]

    @property
    def rules(self) -> list[str | None]:
        return self.rules_of()

    @property
    def actions(self) -> list[str | None]:
        return self.actions_of()

    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        indices, numbers = np.unique(self.chosen[self.chosen >= 0], return_counts=True)
        for index, number in zip(indices.tolist(), numbers.tolist(), strict=True):
            counts[self.names[index]] = counts.get(self.names[index], 0) + int(number)
        return counts


def units_to_keep(spec: SampleSpec, unit_count: int) -> int:
    """round(fraction × units) rounded half up and at least one, or min(count, units)."""
    if spec.count is not None:
        return min(spec.count, unit_count)
    assert spec.fraction is not None
    return min(unit_count, max(1, math.floor(spec.fraction * unit_count + 0.5)))


def sample_rows(rows: list[int], spec: SampleSpec, record_ids: list[str], by_values: list[object] | None) -> list[int]:
    """The rows kept by `spec`: whole units (groups of equal `by` value, or single records)."""
    def unit_of(row: int) -> str:
        if by_values is None or by_values[row] is None:
            return f"record:{record_ids[row]}"  # a record without a group value is its own unit
        return f"value:{by_values[row]}"

    units = sorted({unit_of(row) for row in rows}, key=lambda key: (unit_rank(spec.seed, key), key))
    kept = set(units[: units_to_keep(spec, len(units))]) if units else set()
    return [row for row in rows if unit_of(row) in kept]


ROW_COLUMN = "_guard_row"  # the evaluator's row number; readers refuse metadata columns named _guard*
FILE_TABLE = "_guard_file_{}"  # a pre-read policy file, registered under this internal name

FILE_READERS = frozenset({"read_csv", "read_csv_auto", "read_parquet", "read_json", "read_json_auto"})
# A policy file is a data file next to the policy, named for its reader (optionally compressed).
DATA_SUFFIXES = {
    "read_csv": (".csv", ".tsv", ".txt"), "read_csv_auto": (".csv", ".tsv", ".txt"), "read_parquet": (".parquet",),
    "read_json": (".json", ".jsonl", ".ndjson"), "read_json_auto": (".json", ".jsonl", ".ndjson"),
}
COMPRESSIONS = (".gz", ".zst")
GENERATORS = frozenset({"range", "generate_series", "unnest"})
# Scalar functions that reach the engine's state rather than the records (execution is locked down anyway).
REFUSED_FUNCTIONS = frozenset({
    "current_setting", "getvariable", "write_log", "json_serialize_sql", "json_deserialize_sql",
    "json_execute_serialized_sql", "query", "query_table", "read_text", "read_blob", "glob", "getenv",
    "current_query", "in_search_path",
})
# Parse-tree nodes that are neither expressions nor refused outright (table references are checked one by one).
NODE_TYPES = frozenset({
    "SELECT_NODE", "SET_OPERATION_NODE", "ORDER_MODIFIER", "LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER",
    "DISTINCT_MODIFIER", "ORDER_DEFAULT", "ASCENDING", "DESCENDING", "ORDER_ASCENDING", "ORDER_DESCENDING",
    "BASE_TABLE", "JOIN", "SUBQUERY", "EXPRESSION_LIST", "EMPTY", "TABLE_FUNCTION",
})
NODE_NAMES = {"SHOW_REF": "SHOW/DESCRIBE/SUMMARIZE", "PIVOT": "PIVOT/UNPIVOT", "RECURSIVE_CTE_NODE": "WITH RECURSIVE",
              "CTE_NODE": "WITH"}
# Settings of every connection that touches a policy: no extension is installed or loaded behind our back,
# no Python variable is scanned as a table, nothing spills to a temporary directory.
LOCKED_FROM_THE_START: dict[str, str | bool | int | float | list[str]] = {
    "autoinstall_known_extensions": False, "autoload_known_extensions": False, "allow_community_extensions": False,
    "python_enable_replacements": False, "temp_directory": "",
}
SAFE_ERRORS = ("ParserException", "BinderException", "CatalogException")
LOCATION_KEYS = ("query_location", "query_location_length")


class _Refused(Exception):
    """What a `where` tried that it may not; becomes a ConfigError naming the rule."""


@dataclass(frozen=True)
class _Compiled:
    sql: str  # the checked SELECT over `records` and registered files, as DuckDB printed it back
    check_sql: str  # SELECT (expression) FROM records, to check the expression's type
    reads_files: bool


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _scalar(con: Any, query: str, params: list[Any]) -> Any:
    """The single value of a query (fetched to the end, so the connection is free for the next one)."""
    return con.execute(query, params).fetchall()[0][0]


def _without_locations(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _without_locations(v) for k, v in tree.items() if k not in LOCATION_KEYS}
    if isinstance(tree, list):
        return [_without_locations(v) for v in tree]
    return tree


def _string_constant(expression: dict[str, Any]) -> str | None:
    """The text of a string literal node (DuckDB 2.x `literal`, 1.x `value`), else None."""
    if expression.get("class") != "CONSTANT":
        return None
    literal = expression.get("literal")
    if isinstance(literal, dict):
        return literal.get("text") if literal.get("kind") == "STRING" else None
    value = expression.get("value")
    if isinstance(value, dict) and not value.get("is_null") and (value.get("type") or {}).get("id") == "VARCHAR":
        return value.get("value")
    return None


def _set_string_constant(expression: dict[str, Any], text: str) -> None:
    if isinstance(expression.get("literal"), dict):
        expression["literal"]["text"] = text
    else:
        expression["value"]["value"] = text


def _arguments(function: dict[str, Any]) -> list[dict[str, Any]]:
    """A function node's argument expressions, positional first as written."""
    if "arguments" in function:
        return [argument["expression"] for argument in function["arguments"]]
    return list(function.get("children", []))


def _has_subquery(tree: Any) -> bool:
    if isinstance(tree, list):
        return any(_has_subquery(item) for item in tree)
    if not isinstance(tree, dict):
        return False
    if tree.get("class") == "SUBQUERY" or tree.get("type") in ("SELECT_NODE", "TABLE_FUNCTION", "BASE_TABLE"):
        return True
    return any(_has_subquery(value) for value in tree.values())


def _policy_file(base_dir: Path, name: str, reader: str) -> Path:
    """The resolved file `name` names inside `base_dir`; _Refused unless it stays inside it."""
    if not name or any(c in name for c in "*?[]{}\\") or "://" in name or name.startswith("~"):
        raise _Refused(f"file name {name!r} (give a plain file name relative to the policy's folder)")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise _Refused(f"file {name!r} outside the policy's folder (only files next to the policy may be read)")
    if any(part.startswith(".") for part in relative.parts):
        raise _Refused(f"hidden file {name!r} (a dot-file or dot-folder, such as .ssh or .env)")
    suffixes = [suffix.lower() for suffix in relative.suffixes if suffix.lower() not in COMPRESSIONS]
    if not suffixes or suffixes[-1] not in DATA_SUFFIXES[reader]:
        raise _Refused(f"file {name!r} for {reader} (its name must end in {', '.join(DATA_SUFFIXES[reader])})")
    base = base_dir.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise _Refused(f"file {name!r}: it leads outside the policy's folder (symbolic link)")
    if not path.is_file():
        raise FileNotFoundError(name)
    return path


class RuleEvaluator:
    """Runs each rule's `where` in a locked-down DuckDB over the metadata table (see the module docstring).

    All `where`s are checked, and the files they name read, when the evaluator is made; DuckDB is imported
    only when some rule has a `where` (importing it takes about a quarter second).
    """

    def __init__(self, metadata: pa.Table, rules: list[Rule], *, base_dir: Path, source: str,
                 format_name: str | None = None) -> None:
        self.source = source
        self.format_name = format_name  # named in the message for a column the metadata lacks
        self.base_dir = base_dir
        folded = [name.lower() for name in metadata.column_names]
        for name in metadata.column_names:
            if name.lower().startswith("_guard") or folded.count(name.lower()) > 1:
                raise InputError(f"{source}: metadata column {name!r} clashes with another column of the "
                                 "records table (names are compared without case; _guard* is the tool's own)",
                                 hint="rename the column in the dataset's metadata")
        self.table = metadata.append_column(ROW_COLUMN, pa.array(range(metadata.num_rows), pa.int64()))
        self._con: Any = None
        self._compiled: dict[int, _Compiled] = {}
        wheres = [(index, rule.where) for index, rule in enumerate(rules) if rule.where is not None]
        if wheres:
            self._prepare(wheres)

    def _fail(self, index: int, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: rules[{index}].where: {message}")

    def _prepare(self, wheres: list[tuple[int, str]]) -> None:
        import duckdb

        con = duckdb.connect(config=LOCKED_FROM_THE_START)
        con.register("records", self.table)
        template = self._parse(con, self._wrap("true"), 0, "true")
        files: dict[str, str] = {}
        for index, where in wheres:
            tree = self._parse(con, self._wrap(where), index, where)
            try:
                self._check_shape(tree, template)
                reads = self._check_tree(tree["node"]["where_clause"], index, where, files, con)
            except _Refused as refused:
                raise self._fail(index, f"refused {refused} in {_short(where)}") from None
            self._compiled[index] = _Compiled(
                sql=self._print(con, tree),
                check_sql=self._print(con, self._projection(tree)),
                reads_files=reads,
            )
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        self._con = con

    @staticmethod
    def _wrap(where: str) -> str:
        return f"SELECT {ROW_COLUMN} FROM records WHERE (\n{where}\n)"

    def _parse(self, con: Any, query: str, index: int, where: str) -> dict[str, Any]:
        """The one SELECT statement of `query` as a parse tree; refused if `where` made it anything else."""
        import duckdb

        try:
            statements = con.extract_statements(query)
        except duckdb.Error as err:
            raise self._fail(index, f"{str(err).splitlines()[0]} in {_short(where)}") from None
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            kinds = ", ".join(str(s.type).rsplit(".", 1)[-1] for s in statements)
            raise self._fail(index, f"refused statements ({kinds}): a `where` is one expression, in {_short(where)}")
        result = json.loads(_scalar(con, "SELECT json_serialize_sql(?)", [query]))
        if result.get("error") or len(result.get("statements", [])) != 1:
            raise self._fail(index, f"refused {result.get('error_message', 'not one SELECT')} in {_short(where)}")
        statement: dict[str, Any] = result["statements"][0]
        return statement

    @staticmethod
    def _check_shape(tree: dict[str, Any], template: dict[str, Any]) -> None:
        """Everything but the WHERE clause must be the wrapper's own (no clause added around it)."""
        def outer(statement: dict[str, Any]) -> Any:
            node = dict(statement.get("node", {}))
            node.pop("where_clause", None)
            return _without_locations({**statement, "node": node})

        if outer(tree) != outer(template):
            raise _Refused("clauses or statements around the expression (it closes the WHERE clause)")

    def _check_tree(self, tree: Any, index: int, where: str, files: dict[str, str], con: Any) -> bool:
        """Walk the expression's tree against the allow-lists; pre-read files; True if it reads any."""
        reads = False
        if isinstance(tree, list):
            for item in tree:
                reads |= self._check_tree(item, index, where, files, con)
            return reads
        if not isinstance(tree, dict):
            return False
        if tree.get("class") == "FUNCTION":
            name = str(tree.get("function_name", "")).lower()
            if tree.get("schema") or tree.get("catalog"):
                raise _Refused(f"qualified function {tree.get('schema') or tree.get('catalog')}.{name}")
            if name in REFUSED_FUNCTIONS or name.startswith("__"):
                raise _Refused(f"function {name}")
        elif tree.get("class") == "PARAMETER":
            raise _Refused("a prepared-statement parameter")
        elif "class" not in tree and isinstance(tree.get("type"), str):
            kind = tree["type"]
            if kind not in NODE_TYPES:
                raise _Refused(NODE_NAMES.get(kind, kind.replace("_", " ").lower()))
            if kind == "BASE_TABLE":
                self._check_table(tree)
            elif kind == "TABLE_FUNCTION":
                name = str(tree["function"].get("function_name", "")).lower()
                if tree["function"].get("schema") or tree["function"].get("catalog"):
                    raise _Refused(f"qualified table function {name}")
                if name in FILE_READERS:
                    self._read_file(tree, name, index, where, files, con)
                    return True  # replaced by a registered table: nothing left to walk
                if name not in GENERATORS:
                    raise _Refused(f"table function {name} (a `where` may read `records` and "
                                   f"{', '.join(sorted(FILE_READERS))} of files in the policy's folder)")
        if (tree.get("cte_map") or {}).get("map"):
            raise _Refused("WITH (common table expressions)")
        for value in list(tree.values()):
            reads |= self._check_tree(value, index, where, files, con)
        return reads

    @staticmethod
    def _check_table(tree: dict[str, Any]) -> None:
        name = str(tree.get("table_name", ""))
        if tree.get("schema_name") or tree.get("catalog_name") or name.lower() != "records":
            qualified = ".".join(p for p in (tree.get("catalog_name"), tree.get("schema_name"), name) if p)
            raise _Refused(f"table {qualified!r} (the only table is `records`; read a file with read_csv('name.csv'))")
        if tree.get("at_clause"):
            raise _Refused("AT (time travel)")

    def _read_file(self, tree: dict[str, Any], reader: str, index: int, where: str, files: dict[str, str],
                   con: Any) -> None:
        """Read the file a reader call names (checked), register it, and turn the call into that table."""
        function = tree["function"]
        arguments = _arguments(function)
        name = _string_constant(arguments[0]) if arguments else None
        if name is None:
            raise _Refused(f"{reader} whose file is not a plain string (write {reader}('name.csv'))")
        if any(_has_subquery(argument) for argument in arguments[1:]):
            raise _Refused(f"a subquery in the options of {reader}")
        try:
            path = _policy_file(self.base_dir, name, reader)
        except FileNotFoundError:
            raise self._fail(index, f"file {name!r} not found in the policy's folder {self.base_dir.resolve()}") from None
        call = copy.deepcopy(tree)
        _set_string_constant(_arguments(call["function"])[0], str(path))
        call.update(alias="", column_name_alias=[], sample=None)
        key = json.dumps(_without_locations(call), sort_keys=True)  # the same call reads the file once
        if key not in files:
            files[key] = FILE_TABLE.format(len(files))
            con.register(files[key], self._pre_read(call, path, reader, name, index, con))
        table_name = files[key]
        alias = tree.get("alias") or reader
        column_aliases = tree.get("column_name_alias", [])
        sample = tree.get("sample")
        tree.clear()
        tree.update(type="BASE_TABLE", alias=alias, sample=sample, schema_name="", table_name=table_name,
                    column_name_alias=column_aliases, catalog_name="", at_clause=None,
                    qualified_name={"path": [table_name]})

    def _pre_read(self, call: dict[str, Any], path: Path, reader: str, name: str, index: int, con: Any) -> pa.Table:
        """`SELECT * FROM <call>` in a connection that may open `path` and nothing else."""
        import duckdb

        template = json.loads(_scalar(con, "SELECT json_serialize_sql('SELECT * FROM t')", []))
        template["statements"][0]["node"]["from_table"] = call
        query = self._print(con, template["statements"][0])
        reader_con = duckdb.connect(config=LOCKED_FROM_THE_START)
        try:
            reader_con.execute("SET allowed_paths = ?", [[str(path)]])
            reader_con.execute("SET enable_external_access = false")
            reader_con.execute("SET lock_configuration = true")
            table: pa.Table = reader_con.sql(query).to_arrow_table()
            header = self._header(call, path, reader, reader_con, table.column_names)
        except duckdb.Error as err:  # the message may quote the file's lines: never shown
            raise self._fail(index, f"cannot read {name!r} with {reader} ({type(err).__name__}; DuckDB's message "
                                    "is not shown because it may quote the file)") from None
        finally:
            reader_con.close()
        folded = [column.lower() for column in header]
        twins = sorted({column for column in header if folded.count(column.lower()) > 1}, key=str.lower)
        if twins:  # DuckDB would rename the second (opt_out_1): which one does the rule read?
            raise self._fail(index, f"file {name!r}: column name(s) {', '.join(map(repr, twins[:4]))} given more than "
                                    "once (compared without case; DuckDB would rename one): give every column its own name")
        return table

    def _header(self, call: dict[str, Any], path: Path, reader: str, con: Any, names: list[str]) -> list[str]:
        """The file's column names as written, before DuckDB renames a repeated one (`opt_out`, `opt_out_1`):
        Parquet's schema; a CSV's header row (read again without header); every key of a JSON file's objects.
        `names` (DuckDB's) when the call gives the names itself or the CSV has no header row."""
        options: dict[str, Any] = {}
        for argument in call["function"].get("arguments", []):
            expression = argument.get("expression", {})
            if argument.get("name"):  # header := false
                options[str(argument["name"]).lower()] = argument
            elif expression.get("class") == "COMPARISON" and expression.get("left", {}).get("class") == "COLUMN_REF":
                options[str(expression["left"]["column_names"][-1]).lower()] = argument
        if options.keys() & {"names", "column_names", "columns", "column_types", "types", "dtypes"}:
            return names
        if reader == "read_parquet":
            import pyarrow.parquet as pq

            try:
                return list(pq.read_schema(path).names)
            except (pa.ArrowException, OSError):
                return names
        if reader.startswith("read_json"):
            rows = con.execute("SELECT DISTINCT unnest(json_keys(json)) FROM read_json_objects(?) "
                               "WHERE json_type(json) = 'OBJECT'", [str(path)]).fetchall()
            return [str(row[0]) for row in rows]
        if all(name == f"column{i}" for i, name in enumerate(names)):  # DuckDB found no header row
            return names
        again = copy.deepcopy(call)
        template = json.loads(_scalar(con, "SELECT json_serialize_sql('SELECT * FROM read_csv(''x'', header = false)')", []))
        header_false = template["statements"][0]["node"]["from_table"]["function"]["arguments"][1]
        again["function"]["arguments"] = [a for a in again["function"]["arguments"] if a not in [options.get("header")]]
        again["function"]["arguments"].append(header_false)
        select = json.loads(_scalar(con, "SELECT json_serialize_sql('SELECT * FROM t LIMIT 1')", []))
        select["statements"][0]["node"]["from_table"] = again
        first = con.sql(self._print(con, select["statements"][0])).fetchall()
        return [str(value) for value in first[0]] if first else names

    @staticmethod
    def _projection(tree: dict[str, Any]) -> dict[str, Any]:
        """`SELECT (expression) FROM records` from the checked WHERE tree, to learn the expression's type."""
        projected = copy.deepcopy(tree)
        node = projected["node"]
        node["select_list"] = [node.pop("where_clause")]
        node["where_clause"] = None
        return projected

    @staticmethod
    def _print(con: Any, statement: dict[str, Any]) -> str:
        document = {"error": False, "statements": [statement]}
        return str(_scalar(con, "SELECT json_deserialize_sql(?::JSON)", [json.dumps(document)]))

    def matching_rows(self, rule: Rule, index: int) -> np.ndarray:
        """The rows `rule` matches, ascending (int64)."""
        if rule.where is None:
            return np.arange(self.table.num_rows, dtype=np.int64)
        import duckdb

        compiled = self._compiled[index]
        try:
            kind = str(self._con.sql(compiled.check_sql).types[0])
            if kind not in ("BOOLEAN", "NULL", '"NULL"'):
                raise self._fail(index, f"{_short(rule.where)} is a {kind} expression, not a condition "
                                        "(write e.g. column = 'value')")
            rows = self._con.execute(compiled.sql).fetchnumpy()[ROW_COLUMN]
            return np.sort(np.asarray(rows, dtype=np.int64))
        except duckdb.Error as err:
            if compiled.reads_files or type(err).__name__ not in SAFE_ERRORS:
                raise self._fail(index, f"DuckDB could not evaluate {_short(rule.where)} ({type(err).__name__}; "
                                        "its message is not shown because it may quote data)") from None
            message = str(err).splitlines()[0]
            missing = re.search(r'Referenced column "([^"]+)" not found', message)
            if missing and missing.group(1) not in self.table.column_names:
                columns = [c for c in self.table.column_names if c != ROW_COLUMN]
                shown = ", ".join(columns[:30]) + (", …" if len(columns) > 30 else "")
                where = f"the metadata of format {self.format_name}" if self.format_name else "the dataset's metadata"
                raise self._fail(index, f"column {missing.group(1)}: not in {where}; columns are: {shown} "
                                        f"(in {_short(rule.where)})") from None
            raise self._fail(index, f"{message} in {_short(rule.where)}") from None

    def column(self, name: str, index: int) -> list[object]:
        if name not in self.table.column_names or name == ROW_COLUMN:
            raise ConfigError(f"{self.source}: rules[{index}].sample.by: no metadata column {name!r}")
        return self.table.column(name).to_pylist()


def decide(metadata: pa.Table, rules: list[Rule], *, base_dir: Path, source: str,
           format_name: str | None = None) -> Decisions:
    """Apply the policy's rules to every record of `metadata`; every record must end up decided. `format_name`
    (the dataset's format) is named when a `where` uses a column the metadata lacks."""
    evaluator = RuleEvaluator(metadata, rules, base_dir=base_dir, source=source, format_name=format_name)
    chosen = np.full(metadata.num_rows, -1, dtype=np.int32)
    record_ids: list[str] | None = None  # each reader names records by file; only sampling needs them all
    # exclude decides first (an opt-out is never held out), then holdout (a sample of the whole pool, drawn before
    # the licence rules), then clean and protect in the policy's order
    ordered = [(i, r) for i, r in enumerate(rules) if r.action == "exclude"]
    ordered += [(i, r) for i, r in enumerate(rules) if r.action == "holdout"]
    ordered += [(i, r) for i, r in enumerate(rules) if r.action not in ("exclude", "holdout")]
    for index, rule in ordered:
        rows = evaluator.matching_rows(rule, index)
        rows = rows[chosen[rows] < 0]
        if rule.sample is not None:
            if record_ids is None:
                record_ids = cast(list[str], metadata.column("record_id").to_pylist())
            by_values = evaluator.column(rule.sample.by, index) if rule.sample.by else None
            rows = np.asarray(sample_rows(rows.tolist(), rule.sample, record_ids, by_values), dtype=np.int64)
        chosen[rows] = index
    undecided = np.flatnonzero(chosen < 0)
    if len(undecided):
        examples = [str(metadata.column("record_id")[int(row)]) for row in undecided[:5]]
        raise InputError(
            f"{source}: {len(undecided)} record(s) match no rule, e.g. {', '.join(examples)}",
            hint="add a final rule without `where` (e.g. action: protect) to decide the rest",
        )
    return Decisions(names=[r.name for r in rules], rule_actions=[r.action for r in rules], chosen=chosen)
