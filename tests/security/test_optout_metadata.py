"""Attacks on opt-outs through an image folder's metadata file (issue 22, part 1): an opt-out is never lost.

Before: a `file_name` that was a number made DuckDB read every name as quoted JSON, so no row met its image and
the opted-out image was stored as protected (exit 0, "opt-out exclude 1"); a metadata.jsonl beside a metadata.csv
silently replaced it; an opt-out row naming no image (a typo, another Unicode form of the name) became an error
row while the image it meant was prepared. Now a metadata problem either stops `guard prepare` (exit 2, naming the
file and line) or leaves every opted-out image excluded; see curation/listing.py and datasets/metadata_file.py.
The property test at the end checks that invariant on random metadata files against a reader written here.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import lineage, write_policy
from sfbd_guard.prepared.reader import open_prepared

OPT_OUT = "coalesce(CAST(opt_out AS BOOLEAN), false)"  # the shipped policies/imagefolder.yaml rule


def _images(root: Path, names: list[str], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    return root


def _policy(tmp_path: Path, root: Path, out: str = "out", where: str = "opt_out IS TRUE") -> Path:
    policy = {"version": 1, "name": "optout", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": where},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / out)}
    return write_policy(tmp_path / f"{out}.yaml", policy)


def _rows(out: Path) -> dict[str, dict]:
    return {row["record_id"]: row for row in lineage(out).to_pylist()}  # the owner's full manifest (keys/owner.py)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


EIGHT = [f"{i:03d}.png" for i in range(8)]


@pytest.mark.parametrize("bad", [5, ["001.png"]], ids=["number", "list"])
def test_a_mistyped_file_name_does_not_unlist_the_other_opt_outs(cli, tmp_path: Path, bad: object) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    rows = [{"file_name": name, "opt_out": name == "002.png"} for name in EIGHT]
    rows[1]["file_name"] = bad
    (root / "metadata.jsonl").write_text(_jsonl(rows))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert manifest["002.png"]["partition"] == "excluded", "the opt-out row still meets its image"
    assert all(manifest[name]["file_name"] == name for name in EIGHT if name != "001.png"), "names are not quoted"
    bad_row = manifest["metadata.jsonl:2"]
    assert bad_row["partition"] == "error" and bad_row["error"].startswith("metadata.jsonl line 2: file_name is")
    assert manifest["001.png"]["partition"] == "protected" and manifest["001.png"]["opt_out"] is None
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["rule_counts"] == {"opt-out": 1, "rest": 7}
    assert card["listing"] == {"metadata_files": ["metadata.jsonl"], "metadata_rows": 8, "images_without_row": 1,
                               "rows_without_image": 1, "unreadable_rows": 0}
    assert "1 image(s) have no row in metadata.jsonl" in " ".join(result.out.split())


def test_a_mistyped_row_that_opts_out_stops_prepare(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    rows = [{"file_name": name, "opt_out": False} for name in EIGHT]
    rows[5] = {"file_name": 5, "opt_out": True}  # which image it meant cannot be known: it may be 005.png
    (root / "metadata.jsonl").write_text(_jsonl(rows))
    for strict in ((), ("--strict",)):
        result = cli("prepare", "--policy", _policy(tmp_path, root), *strict)
        assert result.code == 2 and "metadata row(s) that an exclude rule matches name no image" in result.err
        assert "metadata.jsonl line 6" in result.err and "Traceback" not in result.err
        assert not (tmp_path / "out").exists()


def test_metadata_jsonl_beside_metadata_csv_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    (root / "metadata.csv").write_text("file_name,opt_out\n" + "".join(
        f"{name},{str(name in ('001.png', '004.png', '006.png')).lower()}\n" for name in EIGHT))
    (root / "metadata.jsonl").write_text(_jsonl([{"file_name": "000.png", "opt_out": False}]))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 2 and "both metadata.csv and metadata.jsonl: keep one" in result.err
    assert not (tmp_path / "out").exists()
    (root / "metadata.jsonl").unlink()
    assert cli("prepare", "--policy", _policy(tmp_path, root)).code == 0
    assert [r for r, row in _rows(tmp_path / "out").items() if row["partition"] == "excluded"] == [
        "001.png", "004.png", "006.png"]


def test_a_root_metadata_file_and_split_folder_files_stay_allowed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", ["train/a.png", "train/b.png", "test/c.png"])
    (root / "metadata.csv").write_text("file_name,opt_out\ntest/c.png,true\n")
    (root / "train" / "metadata.jsonl").write_text(_jsonl([{"file_name": "a.png", "opt_out": True},
                                                           {"file_name": "b.png", "opt_out": False}]))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    partitions = {r: row["partition"] for r, row in _rows(tmp_path / "out").items()}
    assert partitions == {"test/c.png": "excluded", "train/a.png": "excluded", "train/b.png": "protected"}
    (root / "train" / "metadata.csv").write_text("file_name,opt_out\na.png,true\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root, "again"))
    assert result.code == 2 and "train: both metadata.csv and metadata.jsonl: keep one" in result.err


@pytest.mark.parametrize("written", ["missing.png", "Photo.png", "./photo.png", "photo.png ", "photo.PNG"])
def test_an_opt_out_row_naming_no_image_stops_prepare(cli, tmp_path: Path, written: str) -> None:  # type: ignore[no-untyped-def]
    """Case, `./` and trailing spaces are not folded: the row names no image, and it is an opt-out."""
    root = _images(tmp_path / "data", ["photo.png", "other.png"])
    (root / "metadata.csv").write_text(f'file_name,opt_out\nother.png,false\n"{written}",true\n')
    for strict in ((), ("--strict",)):
        result = cli("prepare", "--policy", _policy(tmp_path, root, where=OPT_OUT), *strict)
        assert result.code == 2, result.out
        assert "1 metadata row(s) that an exclude rule matches name no image: metadata.csv line 3" in result.err
        assert repr(written) in result.err and not (tmp_path / "out").exists()


def test_a_row_naming_no_image_that_no_exclude_rule_matches_is_an_error_row(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", ["photo.png"])
    (root / "metadata.csv").write_text("file_name,opt_out\nphoto.png,false\n./photo.png,false\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert manifest["photo.png"]["partition"] == "protected"
    assert manifest["./photo.png"]["partition"] == "error" and "no image has exactly this name" in manifest["./photo.png"]["error"]
    assert "1 metadata row(s) name no image" in " ".join(result.out.split())


def test_an_exclude_rule_counts_by_its_where_not_by_its_sample(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A held-out sample (exclude without `where`) taking a row that names no image is not an opt-out; an opt-out
    rule with a `sample` that leaves the row to a later rule still stops prepare."""
    from sfbd_guard.policy.model import SampleSpec
    from sfbd_guard.policy.rules import sample_rows

    root = _images(tmp_path / "data", [f"{i}.png" for i in range(6)])
    (root / "metadata.csv").write_text("file_name,opt_out\n" + "".join(f"{i}.png,true\n" for i in range(6))
                                       + "ghost.png,false\nspectre.png,true\n")

    def run(rules: list[dict], out: str):  # type: ignore[no-untyped-def]
        policy = {"version": 1, "name": "s", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
                  "rules": [*rules, {"name": "rest", "action": "protect"}], "noise": {"sigma": 0.5},
                  "output": str(tmp_path / out)}
        return cli("prepare", "--policy", write_policy(tmp_path / f"{out}.yaml", policy))

    held_out = {"name": "held-out", "action": "exclude", "sample": {"fraction": 1.0, "seed": 0}}
    result = run([held_out], "held")
    assert result.code == 0, result.err
    assert _rows(tmp_path / "held")["ghost.png"]["partition"] == "error"
    sampled = {"name": "opt-out", "action": "exclude", "where": "opt_out", "sample": {"count": 1, "seed": 0}}
    kept = sample_rows(list(range(7)), SampleSpec(count=1, seed=0), [f"{i}.png" for i in range(6)] + ["spectre.png"],
                       None)
    assert kept == [3], "the sample keeps 3.png: spectre.png falls through to the protect rule"
    result = run([sampled], "sampled")
    assert result.code == 2 and "metadata.csv line 9 ('spectre.png', rule opt-out)" in result.err
    assert "ghost.png" not in result.err

@pytest.mark.parametrize("on_disk,written", [("NFD", "NFC"), ("NFC", "NFD")])
def test_names_are_compared_in_unicode_nfc(cli, tmp_path: Path, on_disk: str, written: str) -> None:  # type: ignore[no-untyped-def]
    name = "Beyoncé/Zoë.png"
    disk = unicodedata.normalize(on_disk, name)
    root = _images(tmp_path / "data", [disk, "other.png"])
    (root / "metadata.jsonl").write_text(_jsonl([{"file_name": unicodedata.normalize(written, name), "opt_out": True},
                                                 {"file_name": "other.png", "opt_out": False}]))
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert set(manifest) == {disk, "other.png"}, "the row met the image, under the image's own name"
    assert manifest[disk]["partition"] == "excluded" and manifest["other.png"]["partition"] == "protected"


def test_an_unreadable_line_stops_prepare_when_the_policy_excludes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _images(tmp_path / "data", EIGHT)
    lines = [json.dumps({"file_name": name, "opt_out": False}) for name in EIGHT]
    lines[3] = '{"file_name": "003.png", "opt_out": true'  # cut short: its opt-out cannot be read
    (root / "metadata.jsonl").write_text("\r\n".join(lines) + "\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 2 and "cannot be read" in result.err and "metadata.jsonl line 4: not valid JSON" in result.err
    no_exclude = {"version": 1, "name": "all", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
                  "rules": [{"name": "rest", "action": "protect"}], "noise": {"sigma": 0.5},
                  "output": str(tmp_path / "plain")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "plain.yaml", no_exclude))
    assert result.code == 0, result.err
    assert _rows(tmp_path / "plain")["metadata.jsonl:4"]["error"] == "metadata.jsonl line 4: not valid JSON"


def test_the_summary_counts_records_actually_excluded(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An opted-out image that cannot be read is an error row, not an exclusion: the rule count says 0."""
    root = _images(tmp_path / "data", ["a.png", "b.png"])
    (root / "broken.png").write_bytes(b"not a png")
    (root / "metadata.csv").write_text("file_name,opt_out\na.png,false\nb.png,false\nbroken.png,true\n")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert result.code == 0, result.err
    assert _rows(tmp_path / "out")["broken.png"]["partition"] == "error"
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["rule_counts"] == {"rest": 2} and card["counts"]["excluded"] == 0
    assert "│ opt-out │ exclude │ 0       │" in result.out
    open_prepared(tmp_path / "out")  # the card's counts are those of the manifest (VerificationError otherwise)


def test_the_shipped_policy_stops_on_an_opt_out_value_it_cannot_read(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """policies/imagefolder.yaml: `Yes ` or `opted out` is not silently read as "no opt-out" (TRY_CAST did)."""
    shipped = Path(__file__).resolve().parents[2] / "policies" / "imagefolder.yaml"
    root = _images(tmp_path / "data", ["a.png", "b.png", "c.png"])
    (root / "metadata.csv").write_text("file_name,license,opt_out\na.png,CC0-1.0,\nb.png,,true\nc.png,,opted out\n")
    result = cli("prepare", "--policy", shipped, "--data-root", root, "--out", tmp_path / "out")
    assert result.code == 2 and "rules[0].where" in result.err and "opted out" not in result.err
    (root / "metadata.csv").write_text("file_name,license,opt_out\na.png,CC0-1.0,\nb.png,,true\nc.png,,false\n")
    result = cli("prepare", "--policy", shipped, "--data-root", root, "--out", tmp_path / "out")
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert rows["b.png"]["partition"] == "excluded" and rows["b.png"]["rule"] == "opt-out"
    held = [name for name in ("a.png", "c.png") if rows[name]["rule"] == "held-out"]  # 5 %, at least one, never b
    assert len(held) == 1 and rows[held[0]]["partition"] == "excluded"
    expected = {"a.png": "clean", "c.png": "protected"}
    assert all(rows[name]["partition"] == expected[name] for name in expected if name not in held)


def test_rows_are_named_by_the_line_they_start_on(tmp_path: Path) -> None:
    """BOM, CRLF/CR/LF mixed, a quoted field over two lines, blank lines: line numbers are the file's own."""
    from sfbd_guard.datasets.metadata_file import read_metadata

    csv_bytes = '\ufefffile_name,note\r\na.png,"two\nlines"\rb.png,x\n\n,empty name\r\nc.png,"bad"x\nd.png,1,2\n'.encode()
    rows = read_metadata(tmp_path / "metadata.csv", csv_bytes, "metadata.csv")
    assert rows.names == ["a.png", "b.png", None, None, None]
    assert rows.lines == [2, 4, 6, 7, 8]
    assert rows.problems[2:] == ["file_name is null or empty", "not a CSV row (',' expected after '\"')",
                                 "3 field(s), the header has 2"]
    assert rows.unreadable == [False, False, False, True, True]
    assert rows.table.column("note").to_pylist() == ["two\nlines", "x", "empty name", None, None]
    jsonl_bytes = ('\ufeff{"file_name": "a.png", "n": 1}\r\n\r{"file_name": 7, "n": 2}\n[1]\n'
                   '{"file_name": "b.png", "file_name": "c.png"}\n{"file_name": "d.png", "n": "x"}').encode()
    rows = read_metadata(tmp_path / "metadata.jsonl", jsonl_bytes, "metadata.jsonl")
    assert rows.names == ["a.png", None, None, None, "d.png"] and rows.lines == [1, 3, 4, 5, 6]
    assert rows.problems[1:4] == ["file_name is a number, not a string", "a list, not a JSON object",
                                  "key 'file_name' appears twice in the object"]
    assert rows.table.column("file_name").to_pylist() == ["a.png", None, None, None, "d.png"]
    assert rows.table.column("n").to_pylist() == ["1", "2", None, None, "x"], "a column of mixed types is text"

@pytest.mark.parametrize("kind", ["float16", "decimal256", "dictionary", "repeated"])
def test_metadata_parquet_of_odd_types_is_read_or_refused_never_a_traceback(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    import decimal

    import pyarrow as pa

    root = _images(tmp_path / "data", ["a.png", "b.png"])
    names, opt_out = pa.array(["a.png", "b.png"]), pa.array([True, False])
    extra = {"float16": pa.array(np.array([1.5, 2.0], np.float16)),
             "decimal256": pa.array([decimal.Decimal("1.50"), None], pa.decimal256(40, 2)),
             "dictionary": pa.array(["x", "y"]).dictionary_encode(), "repeated": pa.array([False, False])}[kind]
    table = pa.Table.from_arrays([names.dictionary_encode() if kind == "dictionary" else names, opt_out, extra],
                                 names=["file_name", "opt_out", "opt_out" if kind == "repeated" else "extra"])
    pq.write_table(table, root / "metadata.parquet")
    result = cli("prepare", "--policy", _policy(tmp_path, root))
    assert "Traceback" not in result.err
    if kind == "repeated":
        assert result.code == 2 and "metadata.parquet: column(s) 'opt_out' appear more than once" in result.err
        return
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert manifest["a.png"]["partition"] == "excluded" and manifest["b.png"]["partition"] == "protected"
    assert manifest["a.png"]["extra"] == {"float16": 1.5, "decimal256": "1.50", "dictionary": "x"}[kind]

@pytest.mark.parametrize("name,data", [
    ("metadata.csv", b"file_name,opt_out,opt_out\na.png,true,false\n"),
    ("metadata.csv", b"file_name,opt_out,Opt_Out\na.png,true,false\n"),
    ("metadata.jsonl", b'{"file_name": "a.png", "opt_out": false}\n{"file_name": "b.png", "OPT_OUT": true}\n'),
])
def test_a_column_given_twice_is_refused_not_silently_won(tmp_path: Path, name: str, data: bytes) -> None:
    from sfbd_guard.datasets.metadata_file import read_metadata
    from sfbd_guard.errors import InputError

    with pytest.raises(InputError, match=r"(appear more than once|differs from another key only in case)"):
        read_metadata(tmp_path / name, data, name)

def test_a_webdataset_json_whose_opt_out_is_ambiguous_is_an_error_row(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`{"opt_out": true, "opt_out": false}` (json.loads keeps the last) and `{"opt_out": false, "OPT_OUT": true}`
    (the second key was dropped) were prepared as protected; each record is now an error row naming why."""
    import io
    import tarfile

    root = tmp_path / "shards"
    root.mkdir()
    members = {"a": '{"opt_out": false}', "twice": '{"opt_out": true, "opt_out": false}',
               "cased": '{"opt_out": false, "OPT_OUT": true}'}
    with tarfile.open(root / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (key, text) in enumerate(members.items()):
            image = io.BytesIO()
            Image.fromarray(np.full((12, 12, 3), 40 * index, np.uint8)).save(image, format="PNG")
            for name, data in ((f"{key}.png", image.getvalue()), (f"{key}.json", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    policy = {"version": 1, "name": "wds", "dataset": {"format": "webdataset", "root": str(root), "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": "opt_out IS TRUE"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "wds.yaml", policy))
    assert result.code == 0, result.err
    manifest = _rows(tmp_path / "out")
    assert manifest["00000/a"]["partition"] == "protected"
    assert manifest["00000/twice"]["partition"] == "error" and "key 'opt_out' appears twice" in manifest["00000/twice"]["error"]
    assert manifest["00000/cased"]["partition"] == "error" and "differ only in case" in manifest["00000/cased"]["error"]

@pytest.mark.parametrize("change", ["identity twice", "identity missing", "attributes twice"])
def test_celeba_lists_that_would_hide_an_identity_opt_out_are_refused(cli, tmp_path: Path, change: str) -> None:  # type: ignore[no-untyped-def]
    """A file listed twice in identity_CelebA.txt (the last line won) or not at all (a null identity escapes
    `identity IN (...)`) was prepared as protected."""
    from fixtures.synthetic import write_celeba

    root = write_celeba(tmp_path / "celeba", 6, identities=2)
    lines = (root / "identity_CelebA.txt").read_text().splitlines()
    first, identity = lines[0].split()
    if change == "identity twice":
        lines.append(f"{first} {int(identity) + 100}")
    elif change == "identity missing":
        lines = lines[1:]
    else:
        with open(root / "list_attr_celeba.txt", "a") as handle:
            handle.write(f"{first} " + " ".join(["1"] * 40) + "\n")
    (root / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    policy = {"version": 1, "name": "celeba", "dataset": {"format": "celeba", "root": str(root), "split": "all",
                                                          "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": f"identity = {identity}"},
                        {"name": "rest", "action": "protect"}], "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "c.yaml", policy))
    assert result.code == 2, result.out
    assert {"identity twice": "is listed twice (also on line 1)", "identity missing": "no identity for 1 file(s)",
            "attributes twice": "is listed twice"}[change] in result.err

# ---- the invariant, on random metadata files -------------------------------------------------------------------
# Random image folders (names in NFC or NFD on disk) with a random metadata file (csv, jsonl or parquet; rows
# naming their image exactly, in the other Unicode form, with a different case, `./` or a trailing space, or with
# a file_name that is a number, a list, null or missing; opt_out values of odd types; duplicates; byte-order marks,
# mixed line ends, every CSV quoting style; now and then a line cut short or a CSV row with a field too many).
# A reader written here, as simply as possible, says which images opted out; `guard prepare` (the library call)
# must then either refuse (InputError, exit 2) or leave every one of them out of clean and protected.

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

STEMS = ("a", "b", "Zoë", "Beyoncé", "naïve café", "x,y", 'say "hi"', "Ångström", "trail ")
OPT_OUT_RULE = "lower(CAST(opt_out AS VARCHAR)) IN ('true', 'yes', '1')"
MISSING = object()  # a key left out of a JSON line (an empty field in a CSV)
VALUES = (True, True, False, False, None, MISSING, "true", "false", "yes", "no", "TRUE", 1, 0, "1", "0", "", "maybe",
          2, [True])
NOTES = ("", "plain", "comma, inside", 'a "quote"', "two\nlines", "cr\rline", "ünï", "123", "true")


def _says_opt_out(value: object) -> bool:
    """What OPT_OUT_RULE means, on a value as written (the oracle's reading)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value == 1
    return isinstance(value, str) and value.lower() in ("true", "yes", "1")


@st.composite
def _datasets(draw: st.DrawFn) -> dict:
    stems = draw(st.lists(st.sampled_from(STEMS), min_size=1, max_size=5, unique=True))
    images = [unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), stem) + ".png" for stem in stems]
    rows = []
    for image in images:
        for _ in range(draw(st.sampled_from([0] + [1] * 12 + [2]))):
            name = draw(st.sampled_from([image] * 20 + [unicodedata.normalize("NFC", image),
                                                       unicodedata.normalize("NFD", image), image.upper(),
                                                       "./" + image, image + " ", 5, None, [image], MISSING]))
            rows.append({"file_name": name, "opt_out": draw(st.sampled_from(VALUES)),
                         "license": draw(st.sampled_from(["CC0", "other", None])), "note": draw(st.sampled_from(NOTES))})
    for ghost in draw(st.sampled_from([[]] * 4 + [["ghost.png"], ["b.PNG"], ["sub/a.png"]])):
        rows.append({"file_name": ghost, "opt_out": draw(st.sampled_from(VALUES)), "license": "CC0", "note": ""})
    if rows:  # every column present in some row (a policy naming a column the metadata lacks is refused anyway)
        rows[0] = {**rows[0], "opt_out": draw(st.sampled_from([v for v in VALUES if v is not MISSING]))}
    rows = draw(st.permutations(rows))
    return {"images": images, "rows": rows, "format": draw(st.sampled_from(["csv", "jsonl", "parquet"])),
            "bom": draw(st.booleans()), "ends": draw(st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=3)),
            "quoting": draw(st.sampled_from(["minimal", "all", "nonnumeric"])),
            "damage": draw(st.sampled_from([None] * 8 + ["cut", "extra"]))}


def _csv_text(value: object) -> str:
    if value is MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def _write_metadata(root: Path, data: dict) -> Path:
    import csv
    import io

    import pyarrow as pa

    rows, ends = data["rows"], data["ends"]
    columns = ["file_name", "opt_out", "license", "note"]
    if data["format"] == "parquet":
        arrays = {}
        for column in columns:
            values = [None if row[column] is MISSING else row[column] for row in rows]
            try:
                arrays[column] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # as a person would store mixed values: as text
                arrays[column] = pa.array([None if v is None else _csv_text(v) for v in values], pa.string())
        path = root / "metadata.parquet"
        pq.write_table(pa.table(arrays) if rows else pa.table({c: pa.array([], pa.string()) for c in columns}), path)
        return path
    lines = []
    if data["format"] == "jsonl":
        for row in rows:
            lines.append(json.dumps({k: v for k, v in row.items() if v is not MISSING}, ensure_ascii=False))
    else:
        quoting = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "nonnumeric": csv.QUOTE_NONNUMERIC}[data["quoting"]]
        for values in [columns] + [[_csv_text(row[c]) for c in columns] for row in rows]:
            buffer = io.StringIO()
            csv.writer(buffer, quoting=quoting, lineterminator="").writerow(values)
            lines.append(buffer.getvalue())
    if data["damage"] and len(lines) > 1:
        index = len(lines) // 2
        lines[index] = lines[index][: len(lines[index]) // 2] if data["damage"] == "cut" else lines[index] + ",extra"
    text = "".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    path = root / f"metadata.{data['format']}"
    path.write_bytes(("\ufeff" if data["bom"] else "").encode() + text.encode())
    return path


def _oracle(path: Path) -> list[tuple[object, object]]:
    """(file_name, opt_out) of every row this simple reader can read; rows it cannot read are skipped."""
    import csv
    import io
    import re

    if path.suffix == ".parquet":
        return [(row.get("file_name"), row.get("opt_out")) for row in pq.read_table(path).to_pylist()]
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    found: list[tuple[object, object]] = []
    if path.suffix == ".jsonl":
        for line in re.split(r"\r\n|\r|\n", text):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                found.append((row.get("file_name"), row.get("opt_out")))
        return found
    try:
        for row in csv.DictReader(io.StringIO(text, newline="")):
            found.append((row.get("file_name"), row.get("opt_out")))
    except csv.Error:
        pass
    return found


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_datasets())
def test_no_opt_out_ever_lands_in_clean_or_protected(data: dict) -> None:
    import tempfile

    from sfbd_guard.curation.prepare import prepare
    from sfbd_guard.errors import InputError
    from sfbd_guard.policy.model import load_policy

    with tempfile.TemporaryDirectory(prefix="optout-") as folder:
        tmp = Path(folder)
        root = _images(tmp / "data", data["images"])
        path = _write_metadata(root, data)
        by_nfc = {unicodedata.normalize("NFC", image): image for image in data["images"]}
        opted: set[str] = set()
        orphans = []  # opt-out rows whose file_name names no image
        for name, value in _oracle(path):
            if _says_opt_out(value):
                image = by_nfc.get(unicodedata.normalize("NFC", name)) if isinstance(name, str) else None
                (opted.add(image) if image else orphans.append(name))
        policy = {"version": 1, "name": "prop", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
                  "rules": [{"name": "opt-out", "action": "exclude", "where": OPT_OUT_RULE},
                            {"name": "licensed", "action": "clean", "where": "license = 'CC0'"},
                            {"name": "rest", "action": "protect"}],
                  "noise": {"sigma": 0.5}, "output": str(tmp / "out"), "dedup": {"enabled": False}}
        try:
            prepare(load_policy(write_policy(tmp / "p.yaml", policy)))
        except InputError as err:
            event(f"refused: {str(err)[-90:]}")
            return  # refused (exit 2): nothing was prepared
        assert not orphans, f"an opt-out row naming no image ({orphans}) did not stop prepare"
        manifest = _rows(tmp / "out")
        stored = {r: row["partition"] for r, row in manifest.items() if row["partition"] in ("clean", "protected")}
        assert set(stored) <= set(data["images"]), "only scanned images are stored"
        leaked = sorted(opted & set(stored))
        assert not leaked, f"opted-out image(s) {leaked} stored as {[stored[r] for r in leaked]}"
        event(f"prepared, {'some' if opted else 'no'} opt-outs")
