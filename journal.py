"""--evaluate's records, streamed to disk as they are computed, so a run that was killed (or whose server left
questions unanswered) continues where it stopped when the same command runs again.

The journal is a JSON-lines file beside the report (evaluation_results.partial.jsonl): a first line with the
arguments that decide the answers (their fingerprint), then one line per answered question and row of the
report ({"run": "fine_tuned/generate", "seconds": ..., "record": {...}}). A rerun with the same fingerprint
keeps those records and asks only for the others; a rerun with other arguments says so in one line and starts
afresh, so two runs' records never mix. The final report is computed from the records alone, so it is the
report an uninterrupted run writes (the seconds are summed over the runs for questions/s), and the journal is
removed once the report is written.
"""
import json
from pathlib import Path

import common

# Flags that change how fast the answers come, never what they are (batches are tested equal to one-by-one).
NOT_IN_FINGERPRINT = {"batch_size", "concurrency", "request_timeout", "retries", "output_file", "html"}


def fingerprint(args):
    return {key: value for key, value in sorted(vars(args).items()) if key not in NOT_IN_FINGERPRINT}


class Journal:
    def __init__(self, path, fingerprint):
        self.path, self.records = Path(path), {}
        lines = self.path.read_text(encoding="utf-8").split("\n") if self.path.exists() else []
        entries = []
        for line in filter(str.strip, lines):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
        head = {"fingerprint": json.loads(json.dumps(fingerprint))}  # as it reads back: lists, not tuples
        if entries and entries[0] != head:
            before = entries[0].get("fingerprint", {})
            changed = sorted(key for key in {*before, *head["fingerprint"]}
                             if before.get(key) != head["fingerprint"].get(key))
            print(f"{self.path} holds the records of a run with other arguments ({', '.join(changed)}); "
                  "starting afresh")
            entries = []
        for entry in entries[1:]:
            self.records.setdefault(entry["run"], {})[entry["record"]["id"]] = (entry["record"], entry["seconds"])
        if not entries or len(entries) != sum(1 for line in lines if line.strip()):
            # a new journal, or one rewritten without the line a kill cut short (appending after it would glue
            # the next record to it)
            common.write_text_atomic(self.path, "".join(json.dumps(e, ensure_ascii=False) + "\n"
                                                        for e in [head, *entries[1:]]))
        self.file = open(self.path, "a", encoding="utf-8")
        if self.records:
            print(f"resuming from {self.path}: " + ", ".join(f"{run} {len(done)} questions"
                                                               for run, done in self.records.items()))

    def done(self, run):
        """{question id: (record, seconds)} already answered for this row of the report."""
        return self.records.get(run, {})

    def write(self, run, record, seconds):
        # flushed per record: a kill -9 loses at most the line being written
        self.file.write(json.dumps({"run": run, "seconds": seconds, "record": record}, ensure_ascii=False) + "\n")
        self.file.flush()

    def remove(self):
        self.file.close()
        self.path.unlink()
