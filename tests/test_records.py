import json

import pytest

from training.records import Record, RecordError, load_records, split_per_task, train_test_records, write_jsonl

GOOD = {"instruction": "Say it", "input": "hello", "output": "hi", "domain": "fin", "task": "greet"}


def _lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_roundtrip(tmp_path):
    records = [Record(**GOOD), Record(**{**GOOD, "input": "bye", "task": "part"})]
    assert load_records(write_jsonl(records, tmp_path / "r.jsonl")) == records


@pytest.mark.parametrize("row, field, message", [
    ("{not json", None, "malformed JSON"),
    ({k: v for k, v in GOOD.items() if k != "output"}, "output", "missing"),
    ({**GOOD, "input": "", "instruction": ""}, "input", "empty"),
    ({**GOOD, "task": 3}, "task", "expected a string"),
    ({**GOOD, "domain": "a/b"}, "domain", "must not contain"),
    ([1, 2], None, "expected a JSON object"),
])
def test_bad_rows_report_file_line_and_field(tmp_path, row, field, message):
    path = _lines(tmp_path / "bad.jsonl", [GOOD, row, GOOD])
    with pytest.raises(RecordError) as err:
        load_records(path)
    (problem,) = err.value.problems
    assert (problem.file, problem.line, problem.field) == (str(path), 2, field)
    assert message in problem.message and f"{path}:2" in str(err.value)


def test_all_problems_reported_together(tmp_path):
    path = _lines(tmp_path / "bad.jsonl", ["{", {**GOOD, "task": None}, GOOD, "[]"])
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert [p.line for p in err.value.problems] == [1, 2, 4]


def test_empty_input_with_instruction_is_valid_and_routes_on_instruction(tmp_path):
    (record,) = load_records(_lines(tmp_path / "r.jsonl", [{**GOOD, "input": ""}]))
    assert record.text("input") == "Say it" and record.text("instruction+input") == "Say it"


def test_json_list_names_the_bad_element(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "output": 5}]))
    with pytest.raises(RecordError, match=r"r\.json\[1\]: output: expected a string"):
        load_records(path)


def test_as_config_and_directory_tree(tmp_path):
    _lines(tmp_path / "a.jsonl", [{k: v for k, v in GOOD.items() if k not in ("domain", "task")}])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"legal": {"cases": "a.jsonl"}}))
    assert [r.key for r in load_records(config)] == ["legal/cases"]

    tree = tmp_path / "tree"
    (tree / "med" / "qa").mkdir(parents=True)
    _lines(tree / "med" / "qa" / "train.jsonl", [{"input": "x", "output": "y"}])
    assert [r.key for r in load_records(tree)] == ["med/qa"]
    # a test split beside the training file: never pooled with it unless asked for
    _lines(tree / "med" / "qa" / "test.jsonl", [{"input": "q", "output": "a"}])
    with pytest.raises(RecordError, match=r"holds a test split \(med/qa/test.jsonl, ...\) beside train.jsonl"):
        load_records(tree)
    assert sorted(r.input for r in load_records(tree, files="*.jsonl")) == ["q", "x"]
    assert [r.input for r in load_records(tree, files="train*.jsonl")] == ["x"]
    assert [r.input for r in load_records(tree, files="test*.jsonl")] == ["q"]
    with pytest.raises(RecordError, match=r"no <domain>/<task>/dev\*.jsonl files"):
        load_records(tree, files="dev*.jsonl")


def test_as_config_json_list_takes_the_config_keys(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"input": "x", "output": "y"}]))
    (tmp_path / "config.json").write_text(json.dumps({"legal": {"cases": "a.json"}}))
    assert [r.key for r in load_records(tmp_path / "config.json")] == ["legal/cases"]


def test_a_record_contradicting_its_place_is_reported(tmp_path):
    _lines(tmp_path / "a.jsonl", [GOOD])   # says fin/greet
    (tmp_path / "config.json").write_text(json.dumps({"legal": {"cases": "a.jsonl"}}))
    with pytest.raises(RecordError) as err:
        load_records(tmp_path / "config.json")
    assert [(p.line, p.field) for p in err.value.problems] == [(1, "domain"), (1, "task")]


def test_as_config_pointing_at_a_directory_or_a_config(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"legal": {"cases": "dir.jsonl", "self": "config.json"}}))
    with pytest.raises(RecordError) as err:
        load_records(config)
    assert "legal.cases: is a directory" in str(err.value) and "not another config" in str(err.value)


def test_bytes_that_are_not_utf8_are_reported_with_their_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(f"{json.dumps(GOOD)}\n".encode() + b'{"input": "caf\xe9", "output": "y"}\n')   # Latin-1
    with pytest.raises(RecordError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        load_records(path)
    (tmp_path / "latin1.json").write_bytes(b'[{"input": "caf\xe9"}]')
    with pytest.raises(RecordError, match=r"latin1\.json: not UTF-8 text"):
        load_records(tmp_path / "latin1.json")


def test_as_config_missing_file_and_unknown_format(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"legal": {"cases": "nope.jsonl"}}))
    with pytest.raises(RecordError, match="legal.cases: no such file"):
        load_records(config)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(RecordError, match="unknown format '.csv'"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "obj.json").write_text(json.dumps({"input": "x"}))
    with pytest.raises(RecordError, match="unknown format"):
        load_records(tmp_path / "obj.json")
    with pytest.raises(RecordError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")


def test_split_per_task_is_deterministic_and_disjoint():
    records = [Record("", f"q{i}", "a", "fin", f"t{i % 3}") for i in range(60)]
    kept, held = split_per_task(records, 0.1, seed=7)
    assert len(held) == 6 and not set(kept) & set(held)
    assert split_per_task(records, 0.1, seed=7) == (kept, held)
    solo = Record("", "only", "a", "fin", "solo")
    kept, held = split_per_task([*records, solo], 0.1, seed=7)
    assert solo in kept and len(held) == 6   # a task's last row is never held out
    with pytest.raises(ValueError, match="fraction 1.0 is not between 0 and 1"):
        split_per_task(records, 1.0)


def test_train_test_records_takes_a_given_or_the_trees_test_split_else_holds_out_its_own(tmp_path):
    tree = tmp_path / "tree"
    for t in ("a", "b"):
        (tree / "fin" / t).mkdir(parents=True)
        _lines(tree / "fin" / t / "train.jsonl", [{"input": f"{t}{i}", "output": "y"} for i in range(10)])
    train, held = train_test_records(tree, seed=3)   # no test split anywhere: 10% of each task held out
    assert (len(train), len(held)) == (18, 2) and (train, held) == split_per_task(load_records(tree), 0.1, seed=3)

    given = _lines(tmp_path / "given.jsonl", [{**GOOD, "task": "b", "input": "qb"}])
    train, held = train_test_records(tree, given)
    assert (len(train), [r.input for r in held]) == (20, ["qb"])
    unknown = _lines(tmp_path / "unknown.jsonl", [GOOD])
    with pytest.raises(RecordError, match=r"unknown.jsonl: test tasks with no training records: \['fin/greet'\]"):
        train_test_records(tree, unknown)

    _lines(tree / "fin" / "a" / "test.jsonl", [{"input": "qa", "output": "y"}])
    train, held = train_test_records(tree)   # the tree's own test split, never read as training data
    assert (len(train), [r.input for r in held]) == (20, ["qa"])
