"""JSON Lines: line numbers as editors count them, a kill's unfinished last line, text outside ASCII as it is."""

import pytest

from personalm.jsonl import JSONLineError, json_line, read_jsonl, write_jsonl


def test_written_rows_read_back_with_their_line_numbers(tmp_path):
    rows = [{"post_id": "p1", "response": "Café, 10 €"}, [1, 2], "text"]
    assert write_jsonl(tmp_path / "a" / "rows.jsonl", iter(rows)) == 3
    text = (tmp_path / "a" / "rows.jsonl").read_text(encoding="utf-8")
    assert "Café, 10 €" in text and text.count("\n") == 3
    assert list(read_jsonl(tmp_path / "a" / "rows.jsonl")) == [(1, rows[0]), (2, rows[1]), (3, rows[2])]
    assert not list(tmp_path.glob("a/.*"))  # no temporary file left behind


def test_blank_lines_are_skipped_and_an_unfinished_last_line_only_when_asked(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text(json_line({"i": 0}) + "\n  \n" + json_line({"i": 1}) + '{"i": 2')
    assert list(read_jsonl(path, finished_only=True)) == [(1, {"i": 0}), (4, {"i": 1})]
    with pytest.raises(JSONLineError, match=r"part.jsonl: line 5 is not valid JSON") as err:
        list(read_jsonl(path))
    assert (err.value.lineno, err.value.colno) == (5, 8)


def test_a_bad_line_is_named_by_file_and_number(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": }\n')
    found = read_jsonl(path)
    assert next(found) == (1, {"a": 1})
    with pytest.raises(JSONLineError, match=r"x.jsonl: line 2 is not valid JSON \(Expecting value at column 7\)"):
        next(found)


def test_a_write_that_fails_half_way_leaves_no_file(tmp_path):
    def rows():
        yield {"i": 0}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_jsonl(tmp_path / "rows.jsonl", rows())
    assert list(tmp_path.iterdir()) == []
