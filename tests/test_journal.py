"""Evaluation that survives: records are streamed to a journal as they are computed; a run killed with kill -9
and started again with the same arguments continues and writes the report an uninterrupted run writes; other
arguments start afresh, never mixing two runs' records."""
import contextlib
import io
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script

import inference_example as inference
import journal

# on the worker that runs tests/test_inference.py, whose trained adapter (conftest) the kill test evaluates
pytestmark = pytest.mark.xdist_group("inference")


def record(question_id):
    return {"id": question_id, "predicted": "A", "gold": "A", "correct": True}


def test_a_rerun_keeps_the_records_drops_a_cut_line_and_other_arguments_start_afresh(tmp_path):
    path = tmp_path / "eval.partial.jsonl"
    first = journal.Journal(path, {"max_new_tokens": 24, "choices": ("A:x",)})
    first.write("fine_tuned/generate", record(1), 0.5)
    first.write("fine_tuned/generate", record(2), 0.25)
    first.file.close()
    with open(path, "a") as f:
        f.write('{"run": "fine_tuned/generate", "seconds": 0.1, "rec')  # what a kill -9 leaves
    again = journal.Journal(path, {"max_new_tokens": 24, "choices": ("A:x",)})  # a tuple reads back as a list
    assert again.done("fine_tuned/generate") == {1: (record(1), 0.5), 2: (record(2), 0.25)}
    again.write("fine_tuned/generate", record(3), 0.1)
    again.file.close()
    assert [json.loads(line) for line in path.read_text().splitlines()][-1]["record"] == record(3)  # not glued

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        other = journal.Journal(path, {"max_new_tokens": 32, "choices": ("A:x",)})
    assert other.done("fine_tuned/generate") == {}
    assert out.getvalue().count("\n") == 1 and "other arguments (max_new_tokens); starting afresh" in out.getvalue()
    assert len(path.read_text().splitlines()) == 1  # the new run's header alone
    other.remove()
    assert not path.exists()


def test_speed_flags_are_not_part_of_the_fingerprint():
    args = inference.parse_args(["--evaluate", "--batch_size", "4", "--concurrency", "3"])
    faster = inference.parse_args(["--evaluate", "--batch_size", "64", "--concurrency", "9"])
    assert journal.fingerprint(args) == journal.fingerprint(faster)
    assert journal.fingerprint(args) != journal.fingerprint(inference.parse_args(["--evaluate", "--seed", "1"]))


def without_timing(report):
    """The report less how this run went (its speed, and which process answered how many questions)."""
    for result in report["results"].values():
        result.pop("questions_per_second")
        result.pop("answered_per_process")
    return report


@pytest.mark.slow
def test_an_evaluation_killed_with_sigkill_resumes_to_the_report_of_an_uninterrupted_run(
        tmp_path, adapter, model_dir, small_processed):
    flags = ["--evaluate", "--method", "both", "--model_name_or_path", model_dir, "--adapter_path", adapter,
             "--data_path", small_processed, "--num_samples", 24, "--max_new_tokens", 16, "--batch_size", 4]
    killed, partial = tmp_path / "killed.json", tmp_path / "killed.partial.jsonl"
    run = subprocess.Popen([sys.executable, "inference_example.py", *map(str, flags), "--output_file", killed],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (partial.exists() and len(partial.read_text().splitlines()) > 24 + 4):  # into the generate row
        assert time.time() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    written = len(partial.read_text().splitlines()) - 1
    assert not killed.exists() and 24 < written < 48
    resumed = run_script("inference_example.py", *flags, "--output_file", killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and not partial.exists()
    whole = run_script("inference_example.py", *flags, "--output_file", tmp_path / "whole.json")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert without_timing(json.loads(killed.read_text())) == without_timing(json.loads((tmp_path / "whole.json")
                                                                                        .read_text()))
