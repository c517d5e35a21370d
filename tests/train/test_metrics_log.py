"""metrics.jsonl: strict JSON on every line, non-finite floats that come back, record kinds, and resume offsets that
never pad the log with NUL bytes."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.errors import KeelError
from keel.rundir.metrics import MetricsLog, decode_line, encode_record, read_metrics


def strict(line):
    def reject(name):
        raise ValueError(name)

    return json.loads(line, parse_constant=reject)


def write_all(path, records, **kwargs):
    log = MetricsLog(path, **kwargs)
    for record in records:
        log.write(record)
    offset = log.offset()
    log.close()
    return offset


def test_non_finite_floats_are_strict_json_and_read_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    record = {"step": 3, "loss": math.nan, "grad_norm": math.inf, "low": -math.inf, "lr": 0.1 + 0.2,
              "nested": {"values": [1.5, math.nan]}}
    write_all(path, [record])
    line = path.read_text().splitlines()[0]
    assert strict(line)["loss"] == "NaN" and strict(line)["grad_norm"] == "Infinity"
    [back] = read_metrics(path)
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["low"] == -math.inf
    assert back["lr"] == 0.1 + 0.2  # bitwise
    assert back["nested"]["values"][0] == 1.5 and math.isnan(back["nested"]["values"][1])


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.none(),
                          st.text(max_size=5))


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), finite_or_not, max_size=6))
def test_any_record_round_trips_through_strict_json(record):
    line = encode_record(record)
    strict(line)
    back = decode_line(line)
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(back[key])
        elif value in ("NaN", "Infinity", "-Infinity"):  # the documented ambiguity: these three strings read as floats
            assert math.isnan(back[key]) if value == "NaN" else back[key] == float(value)
        else:
            assert back[key] == value and type(back[key]) is type(value)


def test_every_record_gets_a_kind(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_all(path, [{"step": 1, "loss": 2.0, "grad_norm": 1.0}, {"step": 1, "val_loss": 2.5},
                     {"step": 1, "val_loss_ema": 2.4}, {"step": 1, "event": "skipped"},
                     {"step": 1, "event": "eval_done", "val_loss": 1.0}, {"kind": "eval", "step": 1, "score": 3}])
    assert [r["kind"] for r in read_metrics(path)] == ["step", "eval", "eval", "event", "event", "eval"]
    assert all(list(strict(line))[0] == "kind" for line in path.read_text().splitlines())
    with pytest.raises(KeelError, match="kind 'metric' is not a kind; allowed: step, eval, event"):
        MetricsLog(tmp_path / "other.jsonl").write({"kind": "metric"})


def test_records_of_older_logs_get_their_kind_on_reading(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 0, "val_loss": 2.0}\n{"step": 0, "event": "spike"}\n')
    assert [r["kind"] for r in read_metrics(path)] == ["step", "eval", "event"]


def test_the_callers_record_is_not_changed(tmp_path):
    record = {"step": 1, "loss": math.nan}
    write_all(tmp_path / "metrics.jsonl", [record])
    assert list(record) == ["step", "loss"]


def test_a_final_partial_line_is_ignored_but_a_bad_line_inside_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0]
    path.write_text('{"step": 0}\n{"step": 1, "loss": NaN}\n{"step": 2}\n')
    with pytest.raises(KeelError, match="line 2 of .* is not a strict-JSON record"):
        read_metrics(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(KeelError, match="line 2"):
        read_metrics(path)


# ------------------------------------------------------------------------------------------ resume offsets


def test_resume_cuts_the_log_back_to_the_checkpoints_offset(tmp_path):
    path = tmp_path / "metrics.jsonl"
    offset = write_all(path, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}])
    write_all(path, [{"step": 2, "loss": 0.8}])  # trained past the checkpoint, then killed
    write_all(path, [{"step": 2, "loss": 0.7}], truncate_to=offset, report=pytest.fail)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(0, 1.0), (1, 0.9), (2, 0.7)]
    write_all(path, [], truncate_to=0, report=pytest.fail)
    assert path.read_bytes() == b""


def test_a_log_shorter_than_the_offset_is_not_padded_and_the_gap_is_recorded(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_all(path, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}])
    size = path.stat().st_size
    messages = []
    write_all(path, [{"step": 5, "loss": 0.5}], truncate_to=size + 500, step=5, report=messages.append)
    data = path.read_bytes()
    assert b"\x00" not in data
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [("step", 0), ("step", 1), ("event", 5), ("step", 5)]
    assert records[2] == {"kind": "event", "step": 5, "event": "metrics_gap", "expected_bytes": size + 500,
                          "found_bytes": size}
    assert len(messages) == 1 and f"has {size} bytes, fewer than the {size + 500}" in messages[0]


def test_a_missing_log_with_an_offset_is_a_gap(tmp_path):
    path = tmp_path / "metrics.jsonl"
    messages = []
    write_all(path, [], truncate_to=123, report=messages.append)
    assert read_metrics(path) == [{"kind": "event", "event": "metrics_gap", "expected_bytes": 123, "found_bytes": 0}]
    assert len(messages) == 1


def test_a_short_log_ending_in_a_partial_line_loses_only_that_fragment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1, "lo')
    write_all(path, [{"step": 2}], truncate_to=1000, step=2, report=lambda message: None)
    assert [r.get("event", r["step"]) for r in read_metrics(path)] == [0, "metrics_gap", 2]
    assert all(strict(line) for line in path.read_text().splitlines())


def test_an_offset_inside_a_line_means_another_log_and_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_all(path, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}])
    before = path.read_bytes()
    with pytest.raises(KeelError, match="inside a line .* allowed: move it aside"):
        MetricsLog(path, truncate_to=5)
    assert path.read_bytes() == before
