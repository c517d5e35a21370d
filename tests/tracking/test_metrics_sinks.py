"""MetricsLog sinks (the trackers' way in): every record, with its kind, after it is in the file; a log reopened at a
rollback keeps them; closing the log leaves them alone."""

from keel.rundir.metrics import MetricsLog, read_metrics


class Sink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_sinks_get_each_record_with_its_kind_and_survive_a_reopened_log(tmp_path):
    sink = Sink()
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.add_sink(sink)
    log.add_sink(sink)  # once only
    log.write({"step": 0, "loss": 2.0})
    offset = log.offset()
    log.write({"step": 1, "val_loss": 1.5})
    log.close()
    reopened = MetricsLog(tmp_path / "metrics.jsonl", truncate_to=offset, sinks=log.sinks)
    reopened.write({"step": 1, "event": "rollback"})
    reopened.close()
    assert [r["kind"] for r in sink.records] == ["step", "eval", "event"]
    assert read_metrics(tmp_path / "metrics.jsonl") == [sink.records[0], sink.records[2]]
