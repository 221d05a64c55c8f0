"""Escaping for the Markdown documents (the datasheet, the Hugging Face model and dataset cards).

Every value those documents quote from outside the code (licence values from a dataset's metadata, policy and
rule names, `where` clauses, paths, ledger fields) is hostile: a licence of `| protected | MIT | clean | 999 |`
must stay one table cell, a policy name with newlines must not start a heading or a `---` rule, `<script>` must
stay text. Two helpers, used by every writer (never ad-hoc replaces):

- `text(value)`: a value in prose, a heading or a table cell. One line (line breaks and control characters become
  a space); `\\`, `` ` ``, `*`, `_`, `[`, `]`, `|` and `~` backslash-escaped; `&`, `<`, `>` as HTML entities (raw
  HTML never passes); a leading block marker (`#`, `-`, `+`, `=`, `>`, `1.`) escaped, so the value cannot open a
  heading, list, quote or rule even where it starts a line (a trailing `#` too: a heading would drop it).
- `code(value, cell=...)`: a value as an inline code span (shown verbatim): one line, a backtick fence longer than
  any backtick run inside it; in a table cell `|` is written `\\|`, the escape GFM tables honour inside code spans.

The YAML front matter of the cards is written by huggingface_hub (`CardData.to_yaml`, a YAML dumper) and needs
none of this.
"""

from __future__ import annotations

import re

_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")  # line breaks, tabs and every other control character
_INLINE = str.maketrans({"\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "|": "\\|",
                         "~": "\\~", "&": "&amp;", "<": "&lt;", ">": "&gt;"})
_BLOCK_START = re.compile(r"^([#+=-]|\d{1,9}[.)](?=\s|$))")  # heading, list item, setext underline, rule, ordered item


def one_line(value: object) -> str:
    """`value` as one line: runs of line breaks and control characters become one space; ends trimmed."""
    return _BREAKS.sub(" ", str(value)).strip()


def text(value: object) -> str:
    """`value` as literal Markdown text for prose, headings and table cells (see the module's docstring)."""
    escaped = one_line(value).translate(_INLINE)
    if escaped.endswith("#"):  # a heading's closing sequence would drop it
        escaped = escaped[:-1] + "\\#"
    return _BLOCK_START.sub(lambda m: "\\" + m.group(1) if not m.group(1)[0].isdigit()
                            else m.group(1)[:-1] + "\\" + m.group(1)[-1], escaped)


def code(value: object, *, cell: bool = False) -> str:
    """`value` as an inline code span, verbatim; `cell=True` where the span sits in a table cell."""
    line = one_line(value)
    if cell:
        line = line.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", line)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if line.startswith(("`", " ")) or line.endswith(("`", " ")) or not line else ""
    return f"{fence}{pad}{line}{pad}{fence}"


def row(*cells: object) -> str:
    """One table row of already-escaped cells (each one `text(...)`, `code(..., cell=True)` or a number)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"
