"""Inference and evaluation: the parser, the interval, both methods, batched == sequential, the report."""
import json

import pytest

import common
import inference_example as inference
from conftest import run_script

OPTIONS = ["Liver", "Spleen", "Kidney", "Lung"]


@pytest.mark.parametrize("text, letter", [
    ("\n</think>\n\nAnswer: C. Kidney", "C"),
    ("Answer: C", "C"),
    ("**Answer:** (D)", "D"),
    ("The answer is (b).", "B"),
    ("so the answer is B, the spleen", "B"),
    ("<think>A looks wrong, maybe D</think>\nThe final answer is \\boxed{A}", "A"),
    ("\\boxed{ c }", "C"),
    ("B. Spleen", "B"),
    ("(A)", "A"),
    ("Kidney", "C"),
    ("kidney.", "C"),
    ("Answer: Lung", "D"),
    ("I think it reasons about A first.\n</think>\nAnswer: D. Lung", "D"),
    ("It could be the liver or the spleen", None),
    ("Brain", None),
    ("A ring-enhancing lesion is seen", None),
    ("Answer: a small cyst", None),
    ("answer: (c)", "C"),
    ("Answer: B-cell lymphoma", None),
    ("", None),
    ("Answer: E", None),
    ("Absolutely not sure", None),
])
def test_parser_reads_real_world_answer_shapes(text, letter):
    assert common.parse_answer_letter(text, OPTIONS) == letter


def test_an_option_text_that_starts_like_a_letter_is_read_as_text():
    options = ["Liver abscess", "C. difficile colitis", "B-cell lymphoma", "Lung"]
    assert common.parse_answer_letter("\n</think>\n\nAnswer: C. difficile colitis", options) == "B"
    assert common.parse_answer_letter("Answer: B-cell lymphoma", options) == "C"
    assert common.parse_answer_letter("Answer: C. B-cell lymphoma", options) == "C"


def test_wilson_interval_matches_the_textbook_value():
    low, high = inference.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert inference.wilson_interval(0, 20)[0] == 0.0 and inference.wilson_interval(20, 20)[1] == 1.0


def test_summary_counts_parse_failures_and_the_majority_baseline():
    records = [{"gold": g, "predicted": p, "correct": g == p, "options": OPTIONS}
               for g, p in [("C", "C"), ("C", None), ("A", "B"), ("C", "C")]]
    summary = inference.summarize(records, seconds=2.0)
    assert summary["accuracy"] == 0.5 and summary["parse_failures"] == 1
    assert summary["majority_letter"] == "C" and summary["majority_letter_baseline"] == 0.75
    assert summary["chance_baseline"] == 0.25 and summary["questions_per_second"] == 2.0
    assert summary["confusion"]["C"]["unparsed"] == 1 and summary["confusion"]["A"]["B"] == 1


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, small_processed, model_dir):
    out = tmp_path_factory.mktemp("sft")
    result = run_script("train_sft_example.py", "--data_path", small_processed, "--model_name_or_path", model_dir,
                        "--output_dir", out, "--max_samples", 32, "--batch_size", 8, "--grad_accum", 1,
                        "--learning_rate", 3e-3, "--eval_steps", 2, "--save_steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "final_model"


@pytest.fixture(scope="module")
def loaded(adapter, model_dir, small_processed):
    args = inference.parse_args(["--model_name_or_path", str(model_dir), "--adapter_path", str(adapter),
                                 "--data_path", str(small_processed), "--max_new_tokens", "24"])
    model, tokenizer = inference.load_model(args)
    questions, config = inference.load_eval_questions(args)
    return model, tokenizer, questions, config, args


def test_batched_generation_equals_one_by_one_under_greedy(loaded):
    model, tokenizer, questions, config, args = loaded
    # Prompts of different lengths, so left padding really happens.
    by_length = sorted(questions, key=lambda q: len(q["question"]))
    batch = by_length[:3] + by_length[-3:]
    batched = inference.generate_answers(model, tokenizer, batch, config, args)
    one_by_one = [inference.generate_answers(model, tokenizer, [q], config, args)[0] for q in batch]
    assert batched == one_by_one


def test_score_is_batch_independent_and_picks_the_best_option(loaded):
    model, tokenizer, questions, config, _ = loaded
    batch = questions[:5]
    together = inference.score_options(model, tokenizer, batch, config)
    alone = [inference.score_options(model, tokenizer, [q], config)[0] for q in batch]
    for (letter, raw), (letter_alone, raw_alone) in zip(together, alone):
        scores, scores_alone = json.loads(raw), json.loads(raw_alone)
        assert letter == letter_alone == max(scores, key=scores.get)
        assert scores == pytest.approx(scores_alone, abs=1e-3)


def test_evaluate_writes_the_documented_report(adapter, model_dir, small_processed, tmp_path):
    output = tmp_path / "eval.json"
    result = run_script("inference_example.py", "--evaluate", "--method", "both", "--compare_base",
                        "--num_samples", 8, "--max_new_tokens", 24, "--model_name_or_path", model_dir,
                        "--adapter_path", adapter, "--data_path", small_processed, "--output_file", output)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"fine_tuned/score", "fine_tuned/generate", "base/score", "base/generate"}
    for name, r in report["results"].items():
        assert {"n", "accuracy", "ci95", "parse_failure_rate", "confusion", "chance_baseline",
                "majority_letter_baseline", "questions_per_second", "records"} <= set(r)
        assert r["n"] == len(r["records"]) == 8
        assert set(r["records"][0]) == {"id", "question", "options", "gold", "predicted", "raw_output", "correct"}
        if name.endswith("score"):
            assert r["parse_failures"] == 0
    assert "fine_tuned/score" in result.stdout  # the printed table


def test_single_question_and_demo_modes_answer(adapter, model_dir, small_processed):
    common_flags = ["--model_name_or_path", model_dir, "--adapter_path", adapter, "--data_path", small_processed,
                    "--max_new_tokens", 16]
    result = run_script("inference_example.py", "--question", "Which organ is shown?", "--choices", "A:Liver",
                        "B:Spleen", *common_flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parsed answer:" in result.stdout
    result = run_script("inference_example.py", *common_flags, "--interactive",
                        input="What is shown?\nA: Liver\nB: Spleen\n\n")
    assert result.returncode == 0 and result.stdout.count("parsed answer:") == 1, result.stderr[-2000:]
