"""Preprocessing: the format invariants (PMC_VQA_PREPROCESSING_README.md, "The format"), both schemas,
every dirty-row kind, splits that cannot be carved."""
import json

import pytest
from conftest import V1, preprocess, prompter_for, run_in_process, v1_row, write_csv

import common
import preprocess_pmc_vqa_for_sft
import test_preprocessing

V2 = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "split"]


def load(path):
    from datasets import load_from_disk

    return load_from_disk(str(path)), json.loads((path / "preprocessing_stats.json").read_text())


def assert_invariants(splits, model_dir, data_path):
    prompter = prompter_for(data_path, model_dir)
    for split in splits.values():
        for row in split:
            assert test_preprocessing.check_row(row, prompter) == []


def test_every_row_keeps_the_invariants(processed, model_dir):
    splits, _ = load(processed)
    assert set(splits) == {"train", "validation", "test"}
    assert_invariants(splits, model_dir, processed)


def test_prompt_ids_equal_the_inference_scripts_ids_token_for_token(processed, model_dir, tokenizer):
    splits, _ = load(processed)
    row = splits["test"][0]
    ids = prompter_for(processed, model_dir).prompt_ids(row)
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
    splits, stats = preprocess(data_dir, model_dir, out, "--sample_size", 20,
                               *(["--add_reasoning"] if add_reasoning else []))
    assert stats["config"]["add_reasoning"] == add_reasoning
    for row in splits["train"]:
        trained = tokenizer.decode([t for t in row["labels"] if t != -100])
        option = row["options"]["ABCD".index(row["answer_label"])]
        assert trained.endswith(f"Answer: {row['answer_label']}. {option}{tokenizer.eos_token}")
        assert trained.startswith(f"The findings point to {option}.") == add_reasoning
    assert_invariants(splits, model_dir, out)


def test_no_choices_mode_still_parses_back_to_gold(tmp_path, data_dir, model_dir, tokenizer):
    out = tmp_path / "p"
    splits, _ = preprocess(data_dir, model_dir, out, "--sample_size", 20, "--no_include_choices")
    assert not any("Options:" in row["prompt"] for row in splits["train"])
    assert_invariants(splits, model_dir, out)


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


def test_row_ids_name_their_split_so_a_trace_never_reaches_another_split(tmp_path, processed, data_dir):
    splits, _ = load(processed)
    ids = [i for split in splits.values() for i in split["id"]]
    assert len(ids) == len(set(ids))
    # traces generated for the test split (inference's default --split) attach to no training row
    args = preprocess_pmc_vqa_for_sft.parse_args(["--data_path", str(data_dir), "--output_dir", str(tmp_path / "o")])
    frames, dropped, _ = preprocess_pmc_vqa_for_sft.build_splits(
        preprocess_pmc_vqa_for_sft.load_sources(data_dir, "test_clean", "auto")[0], args)
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"id": i, "correct": True, "finished": True, "reasoning": "r"}) + "\n"
                              for i in frames["test"]["id"]))
    args.reasoning_traces = str(traces)
    counts = preprocess_pmc_vqa_for_sft.attach_traces(frames, args, dropped)
    assert counts["questions_with_correct_trace"] == len(frames["test"]) and counts["train_rows_with_trace"] == 0


def test_max_length_keeps_a_row_of_exactly_that_length_and_drops_one_token_more(tmp_path, model_dir):
    path = write_csv(tmp_path / "train.csv", [v1_row(i) for i in range(20)])
    splits, _ = preprocess(path, model_dir, tmp_path / "all")
    longest = max(len(row["input_ids"]) for split in splits.values() for row in split)
    at_longest = sum(len(row["input_ids"]) == longest for split in splits.values() for row in split)
    _, stats = preprocess(path, model_dir, tmp_path / "exact", "--max_length", longest)
    assert "longer_than_max_length" not in stats["rows_dropped"]
    _, stats = preprocess(path, model_dir, tmp_path / "short", "--max_length", longest - 1)
    assert stats["rows_dropped"]["longer_than_max_length"] == at_longest


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
    path = write_csv(tmp_path / "train.csv", clean + [row])
    _, stats = preprocess(path, model_dir, tmp_path / "out")
    assert stats["rows_dropped"] == {reason: 1}
    assert stats["rows_read"] == 41 and stats["rows_kept"] == 40


def test_v2_schema_is_detected_from_the_header_and_mapped_to_one_gold_letter(tmp_path, model_dir, tokenizer):
    rows = [[i, f"fig{i}.jpg", "a caption", f" What colour is {i}? ", " A: Green ", " B: Red", "C:\u00a0Blue ",
             " D: Yellow", "CBAD"[i % 4], "train"] for i in range(30)]
    rows.append([99, "fig99.jpg", "c", "Q?", "A:x", "B:y", "C:z", "D:w", "'", "train"])
    write_csv(tmp_path / "train_2.csv", rows, header=V2)
    write_csv(tmp_path / "test_2.csv", rows[:8], header=V2)
    splits, stats = preprocess(tmp_path, model_dir, tmp_path / "out")
    assert stats["rows_read"] == 39 and stats["rows_dropped"] == {"answer_label_not_a_to_d": 1}
    assert len(splits["test"]) == 8
    row = splits["test"][0]
    assert row["options"] == ["Green", "Red", "Blue", "Yellow"] and row["answer_label"] == "C"
    assert row["question"] == "What colour is 0?"
    assert row["completion"].endswith("Answer: C. Blue")
    assert_invariants(splits, model_dir, tmp_path / "out")


def test_over_long_rows_are_dropped_never_cut(tmp_path, model_dir, tokenizer):
    rows = [v1_row(i) for i in range(20)]
    rows[3][1] = " Which organ " + "is really " * 200 + "marked? "
    path = write_csv(tmp_path / "train.csv", rows)
    splits, stats = preprocess(path, model_dir, tmp_path / "out", "--max_length", 200)
    assert stats["rows_dropped"] == {"longer_than_max_length": 1}
    for split in splits.values():
        for row in split:
            assert row["input_ids"][-1] == tokenizer.eos_token_id and len(row["input_ids"]) <= 200


def test_saved_hf_dataset_is_accepted(tmp_path, model_dir):
    from datasets import Dataset, DatasetDict

    frame = {name: [row[i] for row in (v1_row(j) for j in range(30))] for i, name in enumerate(V1)}
    DatasetDict({"train": Dataset.from_dict(frame), "test": Dataset.from_dict(frame)}).save_to_disk(tmp_path / "hf")
    _, stats = preprocess(tmp_path / "hf", model_dir, tmp_path / "out")
    assert stats["splits"]["test"] == 30 and stats["rows_read"] == 60


def test_self_check_script_passes_on_the_demo_data(data_dir, model_dir):
    result = run_in_process(test_preprocessing.main, "--data_path", data_dir, "--model_name_or_path", model_dir)
    assert result.returncode == 0, result.stderr
    assert "[[" in result.stdout and "OK: " in result.stdout


@pytest.mark.parametrize("thinks", [True, False])
@pytest.mark.parametrize("include_choices", [True, False])
@pytest.mark.parametrize("add_reasoning", [True, False])
def test_parser_reads_back_every_completion_shape(thinks, include_choices, add_reasoning):
    prompt_format = common.PromptFormat(include_choices, add_reasoning, thinks)
    options = ["Liver", "Spleen", "Kidney", "Lung"]
    completion = prompt_format.completion("C", options)
    assert ("</think>" in completion) == thinks
    assert prompt_format.parse(completion, options) == "C"


def test_a_single_csv_with_too_few_figures_is_one_clear_line(tmp_path, model_dir):
    path = write_csv(tmp_path / "one.csv", [v1_row(i, figure="PMC1_F1.png") for i in range(5)] +
                     [v1_row(i, figure="PMC2_F1.png") for i in range(5, 9)])
    result = run_in_process(preprocess_pmc_vqa_for_sft.main, "--data_path", path, "--model_name_or_path", model_dir,
                            "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no usable rows left for the train split" in result.stderr and "at least 3 figures" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_single_csv_with_three_figures_gets_all_three_splits(tmp_path, model_dir):
    rows = [v1_row(i, figure=f"PMC{i % 3}_F1.png") for i in range(9)]
    splits, stats = preprocess(write_csv(tmp_path / "one.csv", rows), model_dir, tmp_path / "out")
    assert stats["splits"] == {"train": 3, "test": 3, "validation": 3}
    figures = [set(split["figure_path"]) for split in splits.values()]
    assert all(len(f) == 1 for f in figures) and len(set.union(*figures)) == 3
