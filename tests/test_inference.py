"""Inference and evaluation: the parser, the interval, the paired statistics, the three methods (shared-prompt
scoring == the naive reference, letters, generation with a thinking budget and votes), the report."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, free_port, run_in_process, run_script

import common
import inference_example as inference
from bench.bench_inference import score_options_naive

OPTIONS = ["Liver", "Spleen", "Kidney", "Lung"]
# one xdist worker runs this file, so its shared fixtures are built once (make test: -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("inference")


@pytest.mark.parametrize("text, letter", [
    ("\n</think>\n\nAnswer: C. Kidney", "C"),
    ("Answer: C", "C"),
    ("**Answer:** (D)", "D"),
    ("The answer is (b).", "B"),
    ("so the answer is B, the spleen", "B"),
    ("<think>A looks wrong, maybe D</think>\nThe final answer is \\boxed{A}", "A"),
    ("\\boxed{ c }", "C"),
    ("The answer is A at first glance.\n\\boxed{C}", "C"),  # the patterns' order: boxed before 'answer is'
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


def test_an_answer_naming_two_options_alike_is_unparsed_not_the_first():
    options = ["Liver", "liver", "Kidney", "Lung"]  # --question --choices can repeat a text
    assert common.parse_answer_letter("\n</think>\n\nAnswer: Liver", options) is None
    assert common.parse_answer_letter("Liver", options) is None
    assert common.parse_answer_letter("Answer: Kidney", options) == "C"


def test_wilson_interval_matches_the_textbook_value():
    low, high = inference.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert inference.wilson_interval(0, 20)[0] == 0.0 and inference.wilson_interval(20, 20)[1] == 1.0


def generated(gold, *samples):
    """A generate record: samples are (predicted letter, status)."""
    votes = [p for p, _ in samples if p]
    predicted = max(votes, key=votes.count) if votes else None
    return {"gold": gold, "predicted": predicted, "correct": predicted == gold, "options": OPTIONS,
            "samples": [{"predicted": p, "status": status, "tokens": 10} for p, status in samples]}


def test_summary_counts_unparsed_and_budget_exhausted_apart_and_the_majority_baseline():
    records = [generated("C", ("C", "answered")), generated("C", (None, "unparsed")),
               generated("A", ("B", "answered")), generated("C", (None, "no_answer_within_budget"))]
    summary = inference.summarize(records, seconds=2.0)
    assert summary["accuracy"] == 0.25 and summary["parse_failures"] == 1
    assert summary["no_answer_within_budget"] == 1 and summary["no_answer_within_budget_rate"] == 0.25
    assert summary["majority_letter"] == "C" and summary["majority_letter_baseline"] == 0.75
    assert summary["chance_baseline"] == 0.25 and summary["questions_per_second"] == 2.0
    assert summary["confusion"]["C"]["unparsed"] == 2 and summary["confusion"]["A"]["B"] == 1


def test_a_think_block_never_closed_is_no_answer_not_a_parse_failure():
    r1, chatml = common.PromptFormat(thinks=True), common.PromptFormat(thinks=False)
    assert r1.answer_part("Hmm, the spleen looks enlarged, so B? Let me check") is None
    assert r1.parse("Hmm, B looks likely. Answer: B", OPTIONS) is None  # still thinking: nothing after </think>
    assert r1.parse("B looks wrong.\n</think>\n\nAnswer: C. Kidney", OPTIONS) == "C"
    assert chatml.parse("Answer: C. Kidney", OPTIONS) == "C"


def test_votes_over_samples_and_mean_per_sample_accuracy():
    records = [generated("C", ("C", "answered"), ("C", "answered"), ("A", "answered")),
               generated("B", ("A", "answered"), (None, "unparsed"), ("B", "answered"))]
    summary = inference.summarize(records, seconds=1.0)
    assert [r["predicted"] for r in records] == ["C", "A"]  # ties go to the answer seen first
    assert summary["accuracy"] == 0.5 and summary["mean_sample_accuracy"] == pytest.approx(3 / 6)
    assert summary["parse_failures"] == 1 and summary["parse_failure_rate"] == pytest.approx(1 / 6)


def test_collapse_to_one_letter_is_flagged():
    records = [{"gold": g, "predicted": "B", "correct": g == "B", "options": OPTIONS} for g in "ABCDABCDAB"]
    summary = inference.summarize(records, seconds=1.0)
    assert summary["most_predicted_letter"] == "B" and summary["most_predicted_share"] == 1.0
    assert "collapsed" in summary["collapse_warning"]
    healthy = [{**r, "predicted": r["gold"], "correct": True} for r in records]
    assert inference.summarize(healthy, seconds=1.0)["collapse_warning"] is None


def test_paired_comparison_matches_a_hand_computed_case():
    # 20 questions: both right on 8, only the fine-tune on 7, only the base on 1, both wrong on 4.
    pattern = [(1, 1)] * 8 + [(1, 0)] * 7 + [(0, 1)] * 1 + [(0, 0)] * 4
    tuned = {"records": [{"id": i, "correct": bool(t)} for i, (t, _) in enumerate(pattern)]}
    base = {"records": [{"id": i, "correct": bool(b)} for i, (_, b) in enumerate(pattern)]}
    paired = inference.paired_comparison(tuned, base)
    assert paired["accuracy_difference"] == pytest.approx((15 - 9) / 20)
    assert (paired["only_first_correct"], paired["only_second_correct"]) == (7, 1)
    # exact McNemar: 2 * P(X <= 1), X ~ Binomial(8, 1/2) = 2 * (1 + 8) / 256
    assert paired["mcnemar_exact_p"] == pytest.approx(18 / 256)
    low, high = paired["bootstrap_ci95"]
    assert 0.0 < low < 0.3 < high < 0.6  # the mean difference of a 20-pair sample: +0.30, sd ~0.11



@pytest.fixture(scope="session")  # not module: xdist may interleave other files' tests, which would rebuild it
def loaded(adapter, model_dir, small_processed):
    args = inference.parse_args(["--model_name_or_path", str(model_dir), "--adapter_path", str(adapter),
                                 "--data_path", str(small_processed), "--max_new_tokens", "24"])
    model, prompter = inference.load_model(args)
    return model, prompter, inference.load_eval_questions(args), args


def test_the_split_asked_for_is_the_split_evaluated(small_processed):
    from datasets import load_from_disk

    splits = load_from_disk(str(small_processed))
    for split in ("test", "validation"):
        args = inference.parse_args(["--evaluate", "--data_path", str(small_processed), "--split", split,
                                     "--num_samples", "5"])
        assert [q["id"] for q in inference.load_eval_questions(args)] == splits[split]["id"][:5]


def test_batched_generation_equals_one_by_one_under_greedy(loaded):
    model, prompter, questions, args = loaded
    # Prompts of different lengths, so left padding really happens.
    by_length = sorted(questions, key=lambda q: len(q["question"]))
    batch = by_length[:3] + by_length[-3:]
    batched = inference.generate_answers(model, prompter, batch, args)
    one_by_one = [inference.generate_answers(model, prompter, [q], args)[0] for q in batch]
    assert batched == one_by_one


def test_shared_prompt_scores_equal_the_naive_full_rows(loaded):
    model, prompter, questions, _ = loaded
    shared = inference.score_options(model, prompter, questions)
    naive = score_options_naive(model, prompter, questions)
    assert len(shared) == len(naive) == len(questions)
    for new, old in zip(shared, naive):
        assert new["option_scores"] == pytest.approx(old["option_scores"], abs=1e-4)
        assert new["predicted"] == old["predicted"] == max(new["option_scores"], key=new["option_scores"].get)


def test_scores_do_not_depend_on_the_batch(loaded):
    model, prompter, questions, _ = loaded
    batch = questions[:5]
    for method in (inference.score_options, inference.score_letters):
        together = method(model, prompter, batch)
        alone = [method(model, prompter, [q])[0] for q in batch]
        for a, b in zip(together, alone):
            assert a["predicted"] == b["predicted"]
            assert a["option_scores"] == pytest.approx(b["option_scores"], abs=1e-4)


def test_letter_scorer_reads_the_letter_distribution_after_the_answer_head(loaded):
    import torch

    model, prompter, questions, _ = loaded
    tokenizer, question = prompter.tokenizer, questions[0]
    [result] = inference.score_letters(model, prompter, [question])
    # the reference: the full next-token distribution after prompt + "...Answer:", by hand
    head, letter_ids = inference.letter_token_ids(prompter)
    ids = prompter.prompt_ids(question) + head
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    assert [tokenizer.decode([i]) for i in letter_ids] == [" A", " B", " C", " D"]
    assert list(result["option_scores"].values()) == pytest.approx(logprobs[letter_ids].tolist(), abs=1e-4)
    assert result["predicted"] == "ABCD"[int(logprobs[letter_ids].argmax())]


def test_sampled_votes_run_k_samples_per_question(loaded):
    model, prompter, questions, args = loaded
    sampling = SimpleNamespace(**{**vars(args), "temperature": 0.6, "num_return_sequences": 3})
    answers = inference.generate_answers(model, prompter, questions[:2], sampling)
    for answer in answers:  # the vote itself is pinned in test_contracts.py
        assert len(answer["samples"]) == 3
        assert answer["predicted"] == inference.majority_vote(s["predicted"] for s in answer["samples"])
        assert all((s["predicted"] is not None) == (s["status"] == "answered") for s in answer["samples"])
        assert all(0 < s["tokens"] <= 24 for s in answer["samples"])


def test_evaluate_writes_the_documented_report(adapter, model_dir, small_processed, tmp_path):
    import pandas as pd

    output = tmp_path / "new" / "folder" / "eval.json"  # a folder that does not exist yet is created
    result = run_script("inference_example.py", "--evaluate", "--method", "all", "--compare_base",
                        "--num_samples", 8, "--max_new_tokens", 24, "--model_name_or_path", model_dir,
                        "--adapter_path", adapter, "--data_path", small_processed, "--output_file", output)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    methods = ("score", "letter", "generate")
    assert set(report["results"]) == {f"{m}/{method}" for m in ("fine_tuned", "base") for method in methods}
    for name, r in report["results"].items():
        assert {"n", "accuracy", "ci95", "parse_failure_rate", "no_answer_within_budget_rate", "confusion",
                "chance_baseline", "majority_letter_baseline", "collapse_warning", "prediction_distribution",
                "questions_per_second", "records"} <= set(r)
        assert r["n"] == len(r["records"]) == 8
        assert set(r["records"][0]) == {"id", "question", "options", "figure_path", "gold", "predicted", "correct",
                                        "option_scores", "samples"}
        if name.endswith("generate"):
            assert r["records"][0]["option_scores"] is None and "text" in r["records"][0]["samples"][0]
        else:
            assert r["parse_failures"] == 0 and set(r["records"][0]["option_scores"]) == set("ABCD")
        flat = pd.json_normalize(r["records"])
        assert len(flat) == 8 and ("option_scores.A" in flat.columns) == (not name.endswith("generate"))
    assert set(report["paired"]) == {f"fine_tuned/{method} - base/{method}" for method in methods}
    assert set(report["paired"]["fine_tuned/score - base/score"]) >= {"accuracy_difference", "bootstrap_ci95",
                                                                      "mcnemar_exact_p"}
    for name, r in report["results"].items():  # every number recomputed from the report's own records
        assert r["correct"] == sum(q["correct"] for q in r["records"]) and r["accuracy"] == r["correct"] / 8
        assert all(q["correct"] == (q["predicted"] == q["gold"]) for q in r["records"])
    for pair, paired in report["paired"].items():
        first, second = (report["results"][side]["records"] for side in pair.split(" - "))
        assert paired["only_first_correct"] == sum(a["correct"] and not b["correct"] for a, b in zip(first, second))
        assert paired["accuracy_difference"] == pytest.approx(
            (sum(q["correct"] for q in first) - sum(q["correct"] for q in second)) / 8)
    tuned = {m: [q["predicted"] for q in report["results"][f"fine_tuned/{m}"]["records"]] for m in methods}
    assert report["agreement"]["fine_tuned"]["score"]["generate"] == pytest.approx(
        sum(a == b for a, b in zip(tuned["score"], tuned["generate"])) / 8)
    assert report["prompt_format"] == {"include_choices": True, "add_reasoning": False, "thinks": True}
    assert "fine_tuned/letter" in result.stdout and "McNemar" in result.stdout  # the printed table
    page = output.with_name("evaluation_report.html")  # the page, beside the JSON, with every row
    assert f"wrote {page}" in result.stdout
    assert all(f'<tr data-result="{name}">' in page.read_text() for name in report["results"])


def test_single_question_interactive_and_demo_modes_answer(adapter, model_dir, small_processed):
    common_flags = ["--model_name_or_path", model_dir, "--adapter_path", adapter, "--data_path", small_processed,
                    "--max_new_tokens", 16]
    result = run_in_process(inference.main, "--question", "Which organ is shown?", "--choices", "A:Liver",
                            "B:Spleen", *common_flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("parsed answer:") == 1 and "B: Spleen" in result.stdout
    result = run_in_process(inference.main, *common_flags, "--interactive",
                            stdin="What is shown?\nA: Liver\nB: Spleen\n\n")
    assert result.returncode == 0 and result.stdout.count("parsed answer:") == 1, result.stderr[-2000:]
    result = run_in_process(inference.main, *common_flags)  # no mode: three test questions, with their gold
    assert result.returncode == 0 and result.stdout.count("parsed answer:") == 3, result.stderr[-2000:]


def test_torchrun_splits_evaluate_only_and_never_a_server(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flags in (["--question", "Q?"], ["--generate_traces"], ["--evaluate", "--method", "generate", "--server",
                                                                  "http://127.0.0.1:9"]):
        with pytest.raises(common.UsageError, match="run this as one process"):
            inference.parse_args(flags)
    assert inference.parse_args(["--evaluate"]).evaluate


def test_training_ranks_each_score_every_validation_question(monkeypatch):
    """Under torchrun training (no data_parallel.start), evaluate() must not split the accuracy questions: every
    rank scores all of them in step, or FSDP's collective forward passes would hang on uneven shares."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(inference.METHODS, "score", lambda model, prompter, batch: [{"predicted": "A"} for _ in batch])
    questions = [{"id": i, "question": "Q?", "options": OPTIONS, "answer_label": "A"} for i in range(7)]
    result = inference.evaluate(None, None, questions, "score", SimpleNamespace(batch_size=4))
    assert result["n"] == 7 and result["answered_per_process"] == [7]


@pytest.mark.slow
def test_torchrun_splits_the_evaluation_and_writes_the_single_process_report(adapter, model_dir, small_processed,
                                                                            tmp_path):
    flags = ["--evaluate", "--method", "both", "--compare_base", "--num_samples", 7, "--max_new_tokens", 16,
             "--batch_size", 2, "--model_name_or_path", model_dir, "--adapter_path", adapter, "--data_path",
             small_processed]
    alone = run_in_process(inference.main, *flags, "--output_file", tmp_path / "alone.json")
    assert alone.returncode == 0, alone.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(ROOT / "inference_example.py"), *map(str, flags), "--output_file",
                             str(tmp_path / "split.json")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count(f"wrote {tmp_path / 'split.json'}") == 1  # one report, from the first process
    single, split = (json.loads((tmp_path / name).read_text()) for name in ("alone.json", "split.json"))
    assert (single["processes"], split["processes"]) == (1, 2) and split["results"].keys() == single["results"].keys()
    for row, expected in single["results"].items():
        records = split["results"][row]["records"]
        assert [r["id"] for r in records] == [r["id"] for r in expected["records"]]  # every question, in order
        for got, want in zip(records, expected["records"]):  # 7 questions: the processes answered 4 and 3
            assert (got["predicted"], got["samples"]) == (want["predicted"], want["samples"])
            assert got["option_scores"] == (want["option_scores"] and pytest.approx(want["option_scores"], abs=1e-4))
        assert split["results"][row]["accuracy"] == expected["accuracy"]
        assert (expected["answered_per_process"], split["results"][row]["answered_per_process"]) == ([7], [4, 3])
    assert split["paired"].keys() == single["paired"].keys()
    assert not (tmp_path / "split.partial.jsonl").exists()
