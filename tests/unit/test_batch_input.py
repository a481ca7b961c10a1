"""Reading batch input and resuming output (hpcserve batch), without a pool."""

from __future__ import annotations

import json

import pytest

from hpcserve.clients.batch import finished_ids, read_rows
from hpcserve.errors import ConfigError


def write(tmp_path, lines, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_plain_records_fill_the_template(tmp_path):
    path = write(tmp_path, [{"id": "a", "description": "taxi"}, {"description": "hotel"}])
    rows = list(read_rows(path, template="Classify: {description}", model="m", max_tokens=8))
    assert [r.custom_id for r in rows] == ["a", "2"]            # id field, else the line number
    assert rows[0].body == {"model": "m", "messages": [{"role": "user", "content": "Classify: taxi"}],
                            "max_tokens": 8}


def test_openai_batch_format(tmp_path):
    path = write(tmp_path, [{"custom_id": "x", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "other", "prompt": "hi", "max_tokens": 2}}])
    (row,) = read_rows(path, template=None, model="m", max_tokens=8)
    assert (row.custom_id, row.url, row.body) == ("x", "/v1/completions", {"model": "other", "prompt": "hi", "max_tokens": 2})


@pytest.mark.parametrize("lines, template, message", [
    (["{not json"], "{a}", r"rows.jsonl:1: not JSON"),
    ([{"id": 1}], "Classify: {description}", r"rows.jsonl:1: the template needs field\(s\) description"),
    ([{"id": 1, "a": 1}, {"id": 1, "a": 2}], "{a}", r"rows.jsonl:2: custom_id '1' appears twice"),
    ([{"prompt": "x"}], None, r"rows.jsonl:1: expected an OpenAI batch request with custom_id and body"),
    ([{"custom_id": "x", "url": "/v1/embeddings", "body": {}}], None, r"url '/v1/embeddings' is not one of"),
    ([[1, 2]], "{a}", r"rows.jsonl:1: expected a JSON object"),
])
def test_bad_input_names_the_line(tmp_path, lines, template, message):
    with pytest.raises(ConfigError, match=message):
        list(read_rows(write(tmp_path, lines), template=template, model="m", max_tokens=None))


def test_resume_cuts_a_partial_last_line(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "c", "respo')
    assert finished_ids(output) == {"a", "b"}
    assert output.read_text() == '{"custom_id": "a"}\n{"custom_id": "b"}\n'
    assert finished_ids(tmp_path / "absent.jsonl") == set()
