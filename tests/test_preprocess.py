"""Preprocessing: the format invariants of DESIGN.md section 3, both schemas, every dirty-row kind."""
import csv
import json

import pytest

import common
import inference_example
import preprocess_pmc_vqa_for_sft as preprocess
import test_preprocessing
from conftest import run_script

V1 = preprocess.V1_COLUMNS
V2 = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "split"]


def load(path):
    from datasets import load_from_disk

    return load_from_disk(str(path)), json.loads((path / "preprocessing_stats.json").read_text())


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def v1_row(i, label="B", answer=None, b=" B:Spleen ", figure=None):
    options = {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"}
    return [figure or f"PMC{i}_F1.png", f" Which organ is marked {i}? ", answer or options.get(label, "Spleen"),
            " A:Liver ", b, " C: Kidney", "D:\u00a0Lung ", label]


def test_every_row_keeps_the_invariants(processed, tokenizer):
    splits, stats = load(processed)
    assert set(splits) == {"train", "validation", "test"}
    for split in splits.values():
        for row in split:
            assert test_preprocessing.check_row(row, tokenizer, stats["config"]) == []


def test_prompt_ids_equal_the_inference_scripts_ids_token_for_token(processed, tokenizer):
    splits, stats = load(processed)
    row = splits["test"][0]
    ids = inference_example.prompt_token_ids(tokenizer, row["question"], row["options"], stats["config"])
    assert row["input_ids"][:len(ids)] == ids
    assert row["labels"][:len(ids)] == [-100] * len(ids)
    assert row["labels"][len(ids):] == row["input_ids"][len(ids):]
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert row["input_ids"][-1] == tokenizer.eos_token_id and row["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][len(ids):]) == row["completion"] + tokenizer.eos_token
    assert row["completion"].startswith("\n</think>\n\nAnswer: ")


@pytest.mark.parametrize("add_reasoning", [False, True])
def test_reasoning_survives_because_the_completion_is_appended_as_text(tmp_path, data_dir, model_dir, tokenizer,
                                                                       add_reasoning):
    out = tmp_path / "p"
    preprocess.main(["--data_path", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--sample_size", "20", "--num_proc", "1"] + (["--add_reasoning"] if add_reasoning else []))
    splits, stats = load(out)
    assert stats["config"]["add_reasoning"] == add_reasoning
    for row in splits["train"]:
        trained = tokenizer.decode([t for t in row["labels"] if t != -100])
        option = row["options"]["ABCD".index(row["answer_label"])]
        assert trained.endswith(f"Answer: {row['answer_label']}. {option}{tokenizer.eos_token}")
        assert trained.startswith(f"The findings point to {option}.") == add_reasoning
        assert test_preprocessing.check_row(row, tokenizer, stats["config"]) == []


def test_no_choices_mode_still_parses_back_to_gold(tmp_path, data_dir, model_dir, tokenizer):
    out = tmp_path / "p"
    preprocess.main(["--data_path", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--sample_size", "20", "--num_proc", "1", "--no_include_choices"])
    splits, stats = load(out)
    for row in splits["train"]:
        assert "Options:" not in row["prompt"]
        assert test_preprocessing.check_row(row, tokenizer, stats["config"]) == []


def test_stats_account_for_every_row_and_dirty_rows_are_dropped_by_reason(processed):
    splits, stats = load(processed)
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["rows_dropped"].values())
    assert stats["rows_kept"] == sum(len(s) for s in splits.values()) == sum(stats["splits"].values())
    # build_demo_assets plants one row of each kind of dirt in train.csv
    assert stats["rows_dropped"] == {"answer_label_not_a_to_d": 3, "answer_text_matches_no_option": 1,
                                     "choice_prefix_differs_from_column": 1, "missing_answer": 1}
    for name in ("prompt", "completion"):
        lengths = stats["token_lengths"]["train"][name]
        assert 0 < lengths["p50"] <= lengths["p95"] <= lengths["p99"] <= lengths["max"]
    assert sum(stats["answer_distribution"]["test"].values()) == len(splits["test"])
    examples = json.loads((processed / "examples.json").read_text())
    assert examples[0]["trained_text"].startswith(examples[0]["completion"])


def test_validation_is_grouped_by_figure(processed):
    splits, _ = load(processed)
    train_figures = set(splits["train"]["figure_path"])
    assert len(splits["validation"]) > 0
    assert not train_figures & set(splits["validation"]["figure_path"])


@pytest.mark.parametrize("row, reason", [
    (v1_row(1, label="'"), "answer_label_not_a_to_d"),
    (v1_row(1, label='"'), "answer_label_not_a_to_d"),
    (v1_row(1, label="E"), "answer_label_not_a_to_d"),
    (v1_row(1, b=" C:Axillary tumor "), "choice_prefix_differs_from_column"),
    (v1_row(1, answer="N/A"), "missing_answer"),
    (v1_row(1, answer="Brain"), "answer_text_matches_no_option"),
    (v1_row(1, label="C", answer="Spleen"), "answer_text_disagrees_with_label"),
    (v1_row(1, label="A", b=" B:Liver "), "duplicate_option_texts"),
    (v1_row(1, figure="../../etc/passwd"), "unsafe_figure_path"),
    (v1_row(0), "exact_duplicate"),
])
def test_each_dirty_row_kind_is_dropped_and_counted(tmp_path, model_dir, row, reason):
    clean = [v1_row(i) for i in range(40)]
    path = write_csv(tmp_path / "train.csv", V1, clean + [row])
    out = tmp_path / "out"
    preprocess.main(["--data_path", str(path), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--num_proc", "1"])
    _, stats = load(out)
    assert stats["rows_dropped"] == {reason: 1}
    assert stats["rows_read"] == 41 and stats["rows_kept"] == 40


def test_v2_schema_is_detected_from_the_header_and_mapped_to_one_gold_letter(tmp_path, model_dir, tokenizer):
    rows = [[i, f"fig{i}.jpg", "a caption", f" What colour is {i}? ", " A: Green ", " B: Red", "C:\u00a0Blue ",
             " D: Yellow", "CBAD"[i % 4], "train"] for i in range(30)]
    rows.append([99, "fig99.jpg", "c", "Q?", "A:x", "B:y", "C:z", "D:w", "'", "train"])
    write_csv(tmp_path / "train_2.csv", V2, rows)
    write_csv(tmp_path / "test_2.csv", V2, rows[:8])
    out = tmp_path / "out"
    preprocess.main(["--data_path", str(tmp_path), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--num_proc", "1"])
    splits, stats = load(out)
    assert stats["rows_read"] == 39 and stats["rows_dropped"] == {"answer_label_not_a_to_d": 1}
    assert len(splits["test"]) == 8
    row = splits["test"][0]
    assert row["options"] == ["Green", "Red", "Blue", "Yellow"] and row["answer_label"] == "C"
    assert row["question"] == "What colour is 0?"
    assert row["completion"].endswith("Answer: C. Blue")
    for split in splits.values():
        for r in split:
            assert test_preprocessing.check_row(r, tokenizer, stats["config"]) == []


def test_over_long_rows_are_dropped_never_cut(tmp_path, model_dir, tokenizer):
    rows = [v1_row(i) for i in range(20)]
    rows[3][1] = " Which organ " + "is really " * 200 + "marked? "
    path = write_csv(tmp_path / "train.csv", V1, rows)
    out = tmp_path / "out"
    preprocess.main(["--data_path", str(path), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--num_proc", "1", "--max_length", "200"])
    splits, stats = load(out)
    assert stats["rows_dropped"] == {"longer_than_max_length": 1}
    for split in splits.values():
        for row in split:
            assert row["input_ids"][-1] == tokenizer.eos_token_id and len(row["input_ids"]) <= 200


def test_saved_hf_dataset_is_accepted(tmp_path, model_dir):
    from datasets import Dataset, DatasetDict

    frame = {name: [row[i] for row in (v1_row(j) for j in range(30))] for i, name in enumerate(V1)}
    DatasetDict({"train": Dataset.from_dict(frame), "test": Dataset.from_dict(frame)}).save_to_disk(tmp_path / "hf")
    out = tmp_path / "out"
    preprocess.main(["--data_path", str(tmp_path / "hf"), "--model_name_or_path", str(model_dir),
                     "--output_dir", str(out), "--num_proc", "1"])
    _, stats = load(out)
    assert stats["splits"]["test"] == 30 and stats["rows_read"] == 60


def test_self_check_script_passes_on_the_demo_data(data_dir, model_dir):
    result = run_script("test_preprocessing.py", "--data_path", data_dir, "--model_name_or_path", model_dir)
    assert result.returncode == 0, result.stderr
    assert "[[" in result.stdout and "OK: " in result.stdout


def test_parser_reads_back_every_completion_shape():
    for reasoning in (False, True):
        completion = common.build_completion("C", ["Liver", "Spleen", "Kidney", "Lung"], add_reasoning=reasoning)
        assert common.parse_answer_letter(completion, ["Liver", "Spleen", "Kidney", "Lung"]) == "C"
