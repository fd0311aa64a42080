"""A corpus of bad inputs run through the real scripts: each gets exit status 2 and one line naming the fix,
or, for dirty rows, a successful run that counts them. Plus interruption and --help hygiene."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, V1, run_in_process, run_script, v1_row, write_csv

import build_demo_assets as bda
import common
import preprocess_pmc_vqa_for_sft

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
    return run_in_process(preprocess_pmc_vqa_for_sft.main, "--data_path", data_path, "--model_name_or_path",
                          model_dir, "--output_dir", tmp_path / "out", "--num_proc", 1, *extra)


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


# Every UsageError path a user can reach from the command line, run in-process through the scripts' own
# run_main (what running a script does): exit status 2 and one line naming the fix. {tmp}, {model}, {csv},
# {processed}, {no_choices} and {vlm} are filled in per test (a flag given twice: the last wins).
USAGE_ERRORS = [
    ("preprocess", ["--data_path", "{tmp}/nope"], "does not exist"),
    ("preprocess", ["--data_path", "{tmp}/notes.txt"], "not a .csv"),
    ("preprocess", ["--data_path", "{tmp}"], "holds neither train.csv"),
    ("preprocess", ["--data_path", "{tmp}", "--data_version", "v2"], "--data_version v2"),
    ("preprocess", ["--sample_size", "0"], "--sample_size"),
    ("preprocess", ["--val_ratio", "0.7"], "--val_ratio"),
    ("preprocess", ["--reasoning_traces", "{tmp}/none.jsonl"], "--generate_traces"),
    ("preprocess", ["--reasoning_traces", "{tmp}/notes.txt"], "not JSON"),
    ("preprocess", ["--max_length", "8"], "--max_length"),
    ("preprocess", ["--num_proc", "0"], "--num_proc"),
    ("preprocess", ["--max_pixels", "100"], "--max_pixels"),
    ("preprocess", ["--max_pixels", "4096", "--model_name_or_path", "{vlm}"], "drop --max_pixels"),
    ("preprocess", ["--test_file", "{tmp}/none.csv"], "--test_file"),
    ("preprocess", ["--model_name_or_path", "{tmp}/no-model"], "--model_name_or_path"),
    ("train", ["--load_in_8bit", "--load_in_4bit"], "exclusive"),
    ("train", ["--merge", "--load_in_4bit"], "reloaded in 16-bit"),
    ("train", ["--packing", "--group_by_length"], "pick one"),
    ("train", ["--batch_size", "0"], "--batch_size"),
    ("train", ["--grad_accum", "0"], "--grad_accum"),
    ("train", ["--max_samples", "-1"], "positive"),
    ("train", ["--num_epochs", "0"], "positive"),
    ("train", ["--eval_accuracy_samples", "-1"], "--eval_accuracy_samples"),
    ("train", ["--metric_for_best_model", "accuracy", "--eval_accuracy_samples", "0"], "needs --eval_accuracy"),
    ("train", ["--use_liger_kernel"], "liger"),
    ("train", ["--attn_implementation", "flash_attention_2"], "flash-attn"),
    ("train", ["--data_path", "{tmp}/processed.incomplete"], "preprocess_pmc_vqa_for_sft.py"),
    ("train", ["--data_path", "{csv}"], "preprocess_pmc_vqa_for_sft.py"),
    ("train", ["--resume_from_checkpoint", "{tmp}/nope"], "not a complete checkpoint"),
    ("inference", ["--load_in_8bit", "--load_in_4bit"], "exclusive"),
    ("inference", ["--evaluate", "--num_samples", "0"], "--num_samples"),
    ("inference", ["--batch_size", "0"], "--batch_size"),
    ("inference", ["--num_return_sequences", "3"], "--temperature"),
    ("inference", ["--choices", "A:Liver", "B:Spleen"], "goes with --question"),
    ("inference", ["--compare_base", "--no_adapter"], "drop --no_adapter"),
    ("inference", ["--image_control", "blank"], "goes with --evaluate"),
    ("inference", ["--image", "{tmp}/none.png"], "not a file"),
    ("inference", ["--question", "Q?", "--choices", "A:Liver"], "2 to 4 options"),
    ("inference", ["--question", "Q?", "--choices", "X:Liver", "B:Spleen"], 'expected "A:text"'),
    ("inference", ["--report", "{tmp}/none.json"], "NAME=FILE"),
    ("inference", ["--adapter_path", "{tmp}"], "adapter_config.json"),
    ("inference", ["--data_path", "{tmp}/nope", "--no_adapter", "--evaluate"], "not a complete processed dataset"),
    ("inference", ["--split", "nope", "--no_adapter", "--evaluate"], "has no split"),
    ("inference", ["--evaluate", "--no_adapter", "--image_control", "blank"], "vision-language model"),
    ("inference", ["--evaluate", "--no_adapter", "--method", "letter", "--data_path", "{no_choices}"],
     "options shown"),
    ("test_preprocessing", ["--num_rows", "0"], "--num_rows"),
    # an output folder that cannot be made (a file is in its way) fails before any work, never at the end
    ("preprocess", ["--output_dir", "{tmp}/notes.txt/processed"], "--output_dir"),
    ("train", ["--output_dir", "{tmp}/notes.txt/sft"], "--output_dir"),
    ("inference", ["--evaluate", "--output_file", "{tmp}/notes.txt/results.json"], "--output_file"),
    ("inference", ["--generate_traces", "--output_file", "{tmp}/notes.txt/traces.jsonl"], "--output_file"),
]


@pytest.fixture(scope="module")
def no_choices(tmp_path_factory, data_dir, model_dir):
    from conftest import preprocess as preprocess_in_process

    out = tmp_path_factory.mktemp("no-choices") / "data"
    preprocess_in_process(data_dir, model_dir, out, "--sample_size", 8, "--no_include_choices")
    return out


@pytest.mark.parametrize("script, argv, words", USAGE_ERRORS, ids=[f"{s}:{w}" for s, _, w in USAGE_ERRORS])
def test_each_usage_error_is_one_line_and_exit_2(script, argv, words, tmp_path, assets, small_processed,
                                                 no_choices):
    import importlib

    module = importlib.import_module({"preprocess": "preprocess_pmc_vqa_for_sft", "train": "train_sft_example",
                                      "inference": "inference_example"}.get(script, script))
    (tmp_path / "notes" ".txt").write_text("not json\n")
    (tmp_path / "processed.incomplete").mkdir()
    csv_file = write_csv(tmp_path / "rows.csv", clean_rows(4))
    fill = {"tmp": tmp_path, "model": assets.model, "vlm": assets.vlm, "csv": csv_file,
            "processed": small_processed, "no_choices": no_choices}
    defaults = {"preprocess": ["--data_path", "{csv}", "--output_dir", "{tmp}/out"],
                "train": ["--data_path", "{processed}", "--output_dir", "{tmp}/sft"],
                "inference": ["--data_path", "{processed}", "--adapter_path", "{tmp}/none"],
                "test_preprocessing": ["--data_path", "{csv}"]}[script]
    argv = [item.format(**fill) for item in [*defaults, "--model_name_or_path", "{model}", *argv]]
    assert_one_line_error(run_in_process(module.main, *argv), words)


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
