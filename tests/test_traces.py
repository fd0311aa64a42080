"""Keeping the reasoning (rejection-sampling fine-tuning): traces are sampled and resumed without a duplicate
line, only correct ones are trained on, their reasoning survives into the labels token for token, the
counts add up, and the round trip runs end to end on the demo model."""
import json

import pytest
from conftest import preprocess, prompter_for, run_script

import build_demo_assets as bda
import test_preprocessing


def trace(question_id, sample, reasoning, correct, finished=True):
    return {"id": question_id, "sample": sample, "reasoning": reasoning, "answer": "Answer: B", "predicted": "B",
            "gold": "B" if correct else "C", "correct": correct, "tokens": 20, "finished": finished}


def write_traces(path, traces):
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    return path


@pytest.mark.parametrize("fallback", ["empty", "drop"])
def test_only_the_shortest_correct_finished_trace_is_trained_on(tmp_path, data_dir, model_dir, tokenizer, fallback):
    base, _ = preprocess(data_dir, model_dir, tmp_path / "plain", "--sample_size", 12)
    ids = base["train"]["id"]
    traces = write_traces(tmp_path / "traces.jsonl", [
        trace(ids[0], 0, "The dural tail sign points to a meningioma, which is option B here.", True),
        trace(ids[0], 1, "Meningioma: option B.", True),                       # shorter, correct: chosen
        trace(ids[0], 2, "Short.", False),                                     # wrong answer: never used
        trace(ids[1], 0, "Wrong idea.", False),                                # no correct trace
        trace(ids[2], 0, "Unfinished.", True, finished=False),                 # ran out of budget: not used
        trace(ids[3], 0, "The sign fits the answer.", True)])
    splits, stats = preprocess(data_dir, model_dir, tmp_path / "traced", "--sample_size", 12,
                               "--reasoning_traces", traces, "--traces_fallback", fallback)
    rows = {row["id"]: row for row in splits["train"]}
    assert rows[ids[0]]["completion"].startswith("Meningioma: option B.\n</think>\n\nAnswer: ")
    assert rows[ids[3]]["completion"].startswith("The sign fits the answer.\n</think>")
    counts = stats["reasoning_traces"]
    assert counts["traces_read"] == 6 and counts["traces_correct"] == 3
    assert counts["questions_with_correct_trace"] == counts["train_rows_with_trace"] == 2
    assert counts["train_rows_without_trace"] == len(ids) - 2
    if fallback == "empty":
        assert len(rows) == len(ids) and rows[ids[1]]["completion"].startswith("\n</think>")
        assert "no_correct_trace" not in stats["rows_dropped"]
    else:
        assert set(rows) == {ids[0], ids[3]} and stats["rows_dropped"]["no_correct_trace"] == len(ids) - 2
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["rows_dropped"].values())
    prompter = prompter_for(tmp_path / "traced", model_dir)
    for row in rows.values():
        assert test_preprocessing.check_row(row, prompter) == []
        trained = [t for t in row["labels"] if t != -100]
        assert trained == tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    reasoning_ids = tokenizer("Meningioma: option B.", add_special_tokens=False)["input_ids"]
    first = [t for t in rows[ids[0]]["labels"] if t != -100]
    assert first[:len(reasoning_ids)] == reasoning_ids  # the reasoning is trained, token for token
    examples = json.loads((tmp_path / "traced" / "examples.json").read_text())
    assert any("</think>" in e["trained_text"] for e in examples)


@pytest.mark.slow
def test_traces_resume_without_duplicates_after_a_kill(tmp_path, model_dir, small_processed):
    output = tmp_path / "traces.jsonl"
    flags = ["--generate_traces", "--no_adapter", "--model_name_or_path", model_dir, "--data_path", small_processed,
             "--split", "train", "--num_return_sequences", 2, "--temperature", 0.6, "--max_new_tokens", 12,
             "--batch_size", 4, "--output_file", output]
    first = run_script("inference_example.py", *flags, "--num_samples", 4)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = output.read_text().splitlines()
    assert len(lines) == 8 and "questions/s" in first.stdout
    records = [json.loads(line) for line in lines]
    assert all(r["gold"] for r in records)
    assert all(r["correct"] == (r["predicted"] == r["gold"]) for r in records)
    # a kill mid-question: one sample of the last question written, then half a line
    output.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    second = run_script("inference_example.py", *flags, "--num_samples", 6)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(resumed) == 12 and len({(r["id"], r["sample"]) for r in resumed}) == 12
    assert resumed[:6] == records[:6]  # finished questions were kept as they were, not generated again
    assert "3 questions already in" in second.stdout
    for seed, same in [(42, True), (7, False)]:  # 42: the default seed of the first run
        again = tmp_path / f"seed{seed}.jsonl"
        result = run_script("inference_example.py", *flags[:-1], again, "--num_samples", 4, "--seed", seed)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (again.read_text().splitlines() == lines) == same


@pytest.mark.slow
@pytest.mark.xdist_group("demo")  # on the worker that trained demo_run for test_demo.py
def test_round_trip_generate_preprocess_train_evaluate(tmp_path, data_dir, model_dir, demo_run):
    """QUICKSTART's "Keep the reasoning" on the demo: the demo's fine-tune writes traces (the base never closes
    its think block, so it has none to give), they are preprocessed in, trained on, and evaluated."""
    demo_processed, demo_out = demo_run
    traces, processed, out = tmp_path / "traces.jsonl", tmp_path / "traced", tmp_path / "sft"
    steps = [
        ("inference_example.py", "--generate_traces", "--adapter_path", demo_out / "final_model",
         "--model_name_or_path", model_dir, "--data_path", demo_processed, "--split", "train", "--num_samples", 32,
         "--num_return_sequences", 2, "--temperature", 0.6, "--max_new_tokens", 32, "--output_file", traces),
        ("preprocess_pmc_vqa_for_sft.py", "--data_path", data_dir, "--model_name_or_path", model_dir,
         "--output_dir", processed, bda.DEMO_RECIPES["preprocess"], "--reasoning_traces", traces),
        ("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model_dir, "--output_dir", out,
         "--max_samples", 16, "--batch_size", 8, "--grad_accum", 1, "--eval_steps", 2,
         "--eval_accuracy_samples", 8),
        ("inference_example.py", "--evaluate", "--method", "generate", "--num_samples", 8, "--max_new_tokens", 32,
         "--model_name_or_path", model_dir, "--adapter_path", out / "final_model", "--data_path", processed)]
    for script, *args in steps:
        result = run_script(script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    stats = json.loads((processed / "preprocessing_stats.json").read_text())
    counts = stats["reasoning_traces"]
    assert counts["traces_read"] == 64 and counts["train_rows_with_trace"] > 0
    assert counts["train_rows_with_trace"] + counts["train_rows_without_trace"] == stats["splits"]["train"]
    report = json.loads((out / "final_model" / "evaluation_results.json").read_text())
    assert report["results"]["fine_tuned/generate"]["mean_generated_tokens"] > 0
