"""A corpus of bad inputs run through the real scripts: each gets exit status 2 and one line naming the fix,
or, for dirty rows, a successful run that counts them. Plus interruption and --help hygiene."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

import build_demo_assets as bda
import common
from conftest import ROOT, V1, run_script, v1_row, write_csv

SCRIPTS = ["preprocess_pmc_vqa_for_sft.py", "train_sft_example.py", "inference_example.py", "test_preprocessing.py",
           "build_demo_assets.py"]


def clean_rows(n=30):
    return [v1_row(i) for i in range(n)]


def assert_one_line_error(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def preprocess(tmp_path, data_path, model_dir, *extra):
    return run_script("preprocess_pmc_vqa_for_sft.py", "--data_path", data_path, "--model_name_or_path", model_dir,
                      "--output_dir", tmp_path / "out", "--num_proc", 1, *extra)


def make_bad_file(tmp_path, kind):
    path = tmp_path / "train.csv"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "header only":
        write_csv(path, [])
    elif kind == "missing choice column":
        write_csv(path, [row[:6] + row[7:] for row in clean_rows()], header=V1[:6] + V1[7:])
    elif kind == "wrong delimiter":
        write_csv(path, clean_rows(), delimiter=";")
    elif kind == "not utf-8":
        path.write_bytes(",".join(V1).encode() + b"\nPMC1.png,Caf\xe9 ?,x,A:x,B:y,C:z,D:w,A\n")
    elif kind == "all rows dirty":
        write_csv(path, [row[:7] + ["'"] for row in clean_rows()])
    return path


@pytest.mark.parametrize("kind, words", [
    ("empty", ["empty"]),
    ("header only", ["no usable training rows"]),
    ("missing choice column", ["unknown schema", "Choice D", "expected"]),
    ("wrong delimiter", ["unknown schema"]),
    ("not utf-8", ["UTF-8"]),
    ("all rows dirty", ["no usable training rows", "answer_label_not_a_to_d"]),
])
def test_unusable_csv_is_one_clear_line(tmp_path, model_dir, kind, words):
    result = preprocess(tmp_path, make_bad_file(tmp_path, kind), model_dir)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out").exists()


def test_dirty_rows_are_counted_not_fatal(tmp_path, model_dir):
    rows = clean_rows(40)
    rows[1][1] = "Why " * 12500                # a question of 50,000 characters
    rows[2][7] = "F"                           # Answer_label outside A-D
    rows[3][7] = "'"                           # Answer_label of a quote
    rows[4][2] = "Heart"                       # answer text matching no option
    rows[5][4] = " C:Spleen "                  # prefix letter differing from its column
    result = preprocess(tmp_path, write_csv(tmp_path / "train.csv", rows), model_dir, "--max_length", 512)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "preprocessing_stats.json").read_text())
    assert stats["rows_dropped"] == {"longer_than_max_length": 1, "answer_label_not_a_to_d": 2,
                                     "answer_text_matches_no_option": 1, "choice_prefix_differs_from_column": 1}
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["rows_dropped"].values()) == 40


def test_missing_paths_and_bad_numbers_are_one_clear_line(tmp_path, model_dir, small_processed):
    csv_file = write_csv(tmp_path / "train.csv", clean_rows())
    assert_one_line_error(preprocess(tmp_path, tmp_path / "nope", model_dir), "does not exist")
    assert_one_line_error(preprocess(tmp_path, csv_file, model_dir, "--sample_size", 0), "--sample_size")
    assert_one_line_error(preprocess(tmp_path, csv_file, tmp_path / "no-model"), "--model_name_or_path")
    interrupted = tmp_path / "processed.incomplete"
    interrupted.mkdir()
    for data in (interrupted, csv_file):  # an interrupted run's folder; a file where a folder is expected
        result = run_script("train_sft_example.py", "--data_path", data, "--model_name_or_path", model_dir)
        assert_one_line_error(result, "preprocess_pmc_vqa_for_sft.py")
    result = run_script("train_sft_example.py", "--data_path", small_processed, "--load_in_8bit", "--load_in_4bit")
    assert_one_line_error(result, "exclusive")
    result = run_script("train_sft_example.py", "--data_path", small_processed, "--max_samples", -1)
    assert_one_line_error(result, "positive")
    for bad in ("0", "-3"):
        result = run_script("inference_example.py", "--evaluate", "--num_samples", bad)
        assert_one_line_error(result, "--num_samples")
    result = run_script("inference_example.py", "--question", "Q?", "--choices", "A:Liver")
    assert_one_line_error(result, "2 to 4 options")


def test_adapter_folder_without_config_names_the_training_command(tmp_path, model_dir, small_processed):
    (tmp_path / "final_model").mkdir()
    result = run_script("inference_example.py", "--model_name_or_path", model_dir, "--adapter_path",
                        tmp_path / "final_model", "--data_path", small_processed)
    assert_one_line_error(result, "adapter_config.json", "train_sft_example.py")


def test_tokenizer_without_chat_template_is_refused(tmp_path, model_dir):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    result = preprocess(tmp_path, write_csv(tmp_path / "train.csv", clean_rows()), plain)
    assert_one_line_error(result, "no chat template")


@pytest.mark.slow
def test_killed_preprocessing_leaves_nothing_that_looks_complete(tmp_path, model_dir):
    import random

    rows, _ = bda.synthetic_rows(40000, random.Random(0), "PMC")
    data = write_csv(tmp_path / "train.csv", rows)
    out = tmp_path / "processed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "preprocess_pmc_vqa_for_sft.py"), "--data_path", str(data),
                             "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--num_proc", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "0"})  # bars say where it is
    seen = b""
    while b"tokenizing train" not in seen and proc.poll() is None:  # killed in the middle of tokenization
        seen += proc.stderr.read1(4096)
    proc.kill()
    proc.wait()
    assert b"tokenizing train" in seen
    assert not out.exists()
    result = run_script("train_sft_example.py", "--data_path", out, "--model_name_or_path", model_dir)
    assert_one_line_error(result, "not a complete processed dataset")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_instant_imports_no_torch_and_documents_every_flag(script):
    code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
            f"try:\n    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]
    parser_actions = __import__(script[:-3]).make_parser()._actions
    for action in parser_actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        is_switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, common.Switch))
        assert is_switch or "default" in action.help, f"{script} {action.option_strings} lacks its default"
