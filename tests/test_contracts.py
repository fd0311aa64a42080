"""Small pure functions the results rest on, each pinned where a one-line slip would change a number or a
string a user reads: the prompt in every style, the splits, the statistics, the vote, the self-check's own
checks. Fast: no model runs here (bench/mutation_check.py runs this file against mutated copies)."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import V1, v1_row

import common
import generation
import inference_example as inference
import preprocess_pmc_vqa_for_sft as preprocess
import test_preprocessing

OPTIONS = ["Liver", "Spleen", "Kidney", "Lung"]
SHOWN = "Q?\nOptions:\nA: Liver\nB: Spleen\nC: Kidney\nD: Lung\n"


@pytest.mark.parametrize("include_choices, add_reasoning, thinks, user, completion", [
    (True, False, True, SHOWN + 'Give your final answer on the last line as "Answer: <letter>. <option text>".',
     "\n</think>\n\nAnswer: B. Spleen"),
    (False, False, True, 'Q?\nGive your final answer on the last line as "Answer: <answer>".',
     "\n</think>\n\nAnswer: Spleen"),
    (False, False, False, 'Q?\nGive your final answer on the last line as "Answer: <answer>".', "Answer: Spleen"),
    (True, True, True, SHOWN + 'Think briefly, then give your final answer on the last line as '
                               '"Answer: <letter>. <option text>".',
     "The findings point to Spleen.\n</think>\n\nAnswer: B. Spleen"),
    (False, True, False, 'Q?\nThink briefly, then give your final answer on the last line as "Answer: <answer>".',
     "The findings point to Spleen.\n\nAnswer: Spleen"),
])
def test_every_prompt_style_as_exact_strings(include_choices, add_reasoning, thinks, user, completion):
    prompt_format = common.PromptFormat(include_choices=include_choices, add_reasoning=add_reasoning, thinks=thinks)
    assert prompt_format.user_turn(" Q? ", OPTIONS) == user
    assert prompt_format.completion("B", OPTIONS) == completion
    assert prompt_format.parse(completion, OPTIONS) == "B"


def test_split_reasoning_separates_the_trace_from_the_answer_line():
    r1, chatml = common.PromptFormat(thinks=True), common.PromptFormat(thinks=False)
    assert r1.split_reasoning("Spleen is big.\n</think>\n\nAnswer: B. Spleen") == ("Spleen is big.",
                                                                           "Answer: B. Spleen")
    assert r1.split_reasoning("still thinking about B") == ("still thinking about B", "")
    assert chatml.split_reasoning("Spleen is big.\n\nAnswer: B. Spleen") == ("Spleen is big.", "Answer: B. Spleen")
    assert chatml.split_reasoning("Answer: A\nno, Answer: B") == ("Answer: A\nno,", "Answer: B")


def test_validation_holds_out_val_ratio_of_the_figures_never_splitting_one():
    train = pd.DataFrame({"figure_path": [f"f{i // 3}.jpg" for i in range(300)]})  # 100 figures, 3 rows each
    kept, held_out = preprocess.split_validation(train, val_ratio=0.1, seed=0)
    assert held_out["figure_path"].nunique() == 10 and len(held_out) == 30 and len(kept) == 270
    assert not set(kept["figure_path"]) & set(held_out["figure_path"])
    assert preprocess.split_validation(train, val_ratio=0.25, seed=0)[1]["figure_path"].nunique() == 25
    other_seed = preprocess.split_validation(train, val_ratio=0.1, seed=1)[1]
    assert set(other_seed["figure_path"]) != set(held_out["figure_path"])


def v1_csv(path, n, tag):
    pd.DataFrame({"Figure_path": [f"{tag}{i}.jpg" for i in range(n)], "Question": ["Q?"] * n,
                  "Answer": ["Liver"] * n, "Choice A": ["A:Liver"] * n, "Choice B": ["B:Spleen"] * n,
                  "Choice C": ["C:Kidney"] * n, "Choice D": ["D:Lung"] * n, "Answer_label": ["A"] * n}
                 ).to_csv(path, index=False)


def test_the_test_file_flag_picks_the_file_it_names(tmp_path):
    v1_csv(tmp_path / "train.csv", 6, "train")
    v1_csv(tmp_path / "test.csv", 5, "test")
    v1_csv(tmp_path / "test_clean.csv", 2, "clean")
    assert len(preprocess.load_sources(tmp_path, "test_clean", "auto")[0]["test"]) == 2
    assert len(preprocess.load_sources(tmp_path, "test", "auto")[0]["test"]) == 5
    own = tmp_path / "mine.csv"
    v1_csv(own, 3, "mine")
    assert len(preprocess.load_sources(tmp_path, str(own), "auto")[0]["test"]) == 3


def test_the_bootstrap_interval_is_a_95_percent_one():
    # 100 pairs, difference +1 on half: mean 0.5, standard error 0.05, so the 95% interval is about +-0.1.
    first = {"records": [{"id": i, "correct": i < 50} for i in range(100)]}
    second = {"records": [{"id": i, "correct": False} for i in range(100)]}
    low, high = inference.paired_comparison(first, second)["bootstrap_ci95"]
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62


def test_the_wilson_interval_is_a_95_percent_one():
    low, high = inference.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def spread(predicted, gold):
    records = [{"predicted": p, "gold": g} for p, g in zip(predicted, gold)]
    return inference.prediction_spread(records)["collapse_warning"]


def test_collapse_warning_boundaries():
    gold = "ABCD" * 5
    assert spread("B" * 16 + "ACDA", gold)  # 80% B, gold B 25%: collapsed
    assert spread("B" * 15 + "ACDAC", gold) is None  # 75%: an opinion, not a collapse
    assert spread("B" * 10 + "ACDACDACDA", gold) is None  # 50%
    assert spread("B" * 16 + "ACDA", "B" * 16 + "ACDA") is None  # the gold really is 80% B


def test_majority_vote_takes_the_most_voted_letter_and_the_first_seen_on_a_tie():
    assert inference.majority_vote(["A", "B", None, "B"]) == "B"
    assert inference.majority_vote(["C", "A", "A", "C", None]) == "C"
    assert inference.majority_vote([None, None]) is None
    assert inference.majority_vote([None, None, "B"]) == "B"  # unreadable samples never outvote a parsed letter


def test_agreement_counts_shared_predictions_off_the_diagonal():
    def result(letters):
        return {"records": [{"predicted": p} for p in letters]}
    table = inference.agreement({"score": result("ABCD"), "generate": result("ABDD")})
    assert table["score"]["generate"] == table["generate"]["score"] == 0.75
    assert table["score"]["score"] == 1.0


def test_the_summary_is_computed_from_its_records():
    rng = np.random.default_rng(0)
    records = [{"gold": g, "predicted": p, "correct": g == p, "options": OPTIONS}
               for g, p in zip(rng.choice(list("ABCD"), 40), rng.choice(list("ABCD"), 40))]
    summary = inference.summarize(records, seconds=4.0)
    correct = sum(r["correct"] for r in records)
    assert summary["correct"] == correct and summary["accuracy"] == correct / 40
    assert summary["ci95"] == list(inference.wilson_interval(correct, 40))
    assert sum(map(sum, (row.values() for row in summary["confusion"].values()))) == 40
    assert all(summary["confusion"][g][g] == sum(r["correct"] and r["gold"] == g for r in records) for g in "ABCD")


class FakeTokenizer:
    bos_token_id, eos_token_id = 1, 2


class FakePrompter:
    """check_row's view of a model: prompt ids 1 5 6 (bos included), the R1 format."""
    tokenizer, processor, format = FakeTokenizer(), None, common.PromptFormat()

    def prompt_ids(self, row):
        return [1, 5, 6]


GOOD = {"input_ids": [1, 5, 6, 7, 8, 2], "labels": [-100, -100, -100, 7, 8, 2],
        "completion": "\n</think>\n\nAnswer: B. Spleen", "options": OPTIONS, "answer_label": "B"}


@pytest.mark.parametrize("broken, problem", [
    ({"input_ids": [1, 1, 5, 6, 7, 8, 2], "labels": [-100, -100, -100, -100, 7, 8, 2]}, "double bos"),
    ({"input_ids": [1, 5, 9, 7, 8, 2]}, "prompt ids differ"),
    ({"labels": [-100, 5, -100, 7, 8, 2]}, "prompt token is trained"),
    ({"labels": [-100, -100, -100, -100, 8, 2]}, "completion token is not trained"),
    ({"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, -100, 7, 8]}, "trained eos"),
    ({"answer_label": "C"}, "parser does not read"),
])
def test_the_self_check_names_each_broken_invariant(broken, problem):
    assert test_preprocessing.check_row(GOOD, FakePrompter()) == []
    problems = test_preprocessing.check_row({**GOOD, **broken}, FakePrompter())
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("figure, kept", [
    ("/etc/passwd", False), ("\\\\server\\share\\x.png", False), ("C:/figures/x.png", False),
    ("../x.png", False), ("images/../../x.png", False), ("images\\..\\x.png", False),
    ("images/PMC1_F1.png", True), ("PMC..1_F1.png", True),
])
def test_figure_paths_that_could_leave_the_image_folder_are_dropped(figure, kept):
    frame = pd.DataFrame([v1_row(0, figure=figure)], columns=V1)
    _, reason = preprocess.canonical_rows(frame, "test")
    assert reason.tolist() == ["" if kept else "unsafe_figure_path"]


def test_a_row_with_an_empty_option_is_dropped():
    row = v1_row(0)
    row[V1.index("Choice C")] = " C: "
    _, reason = preprocess.canonical_rows(pd.DataFrame([row, v1_row(1)], columns=V1), "test")
    assert reason.tolist() == ["empty_choice", ""]


def test_generated_length_counts_the_eos_and_not_the_padding():
    assert generation.generated_length([5, 6, 2, 0, 0], eos=2) == 3
    assert generation.generated_length([5, 6, 7], eos=2) == 3  # the budget ran out: every token counts


def test_the_chance_baseline_follows_each_questions_option_count():
    records = [{"gold": "A", "predicted": "A", "correct": True, "options": OPTIONS[:n]} for n in (2, 4)]
    assert inference.summarize(records, seconds=1.0)["chance_baseline"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_resumed_traces_keep_only_questions_with_all_their_samples(tmp_path):
    path = tmp_path / "traces.jsonl"
    lines = [json.dumps({"id": q, "sample": s}) for q, s in (("a", 0), ("a", 1), ("b", 0))]
    path.write_text("\n".join(lines) + '\n{"id": "c", "sam')  # b lacks a sample; c was cut mid-line
    assert inference.resume_traces(path, k=2) == {"a"}
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "a"]


def test_auto_precision_is_fp32_on_a_cpu_and_4_bit_is_qlora_nf4():
    import torch

    if not torch.cuda.is_available():
        assert common.pick_dtype("auto") == torch.float32
    assert common.pick_dtype("bf16") == torch.bfloat16
    config = common.quantization_config(True, False, torch.bfloat16)
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)
    assert common.quantization_config(False, False, torch.float32) is None


class FakeVisionPrompter(FakePrompter):
    """A VLM's view: image token 9 in the prompt."""
    processor = SimpleNamespace(image_token_id=9)

    def prompt_ids(self, row):
        return [1, 9, 6]


def test_the_self_check_catches_a_trained_image_token():
    clean = {**GOOD, "input_ids": [1, 9, 6, 7, 8, 2]}
    assert test_preprocessing.check_row(clean, FakeVisionPrompter()) == []
    trained = {**GOOD, "input_ids": [1, 9, 6, 9, 8, 2], "labels": [-100, -100, -100, 9, 8, 2]}
    assert test_preprocessing.check_row(trained, FakeVisionPrompter()) == ["an image token is trained"]
