"""The real-model tier: the whole pipeline on SmolLM2-135M-Instruct, a real pretrained Llama-architecture chat
model (49k BPE, ChatML, pad == eos, no think block), so no claim rests on the tiny model alone."""
import json

import pytest
from conftest import preprocess, prompter_for, run_script

import test_preprocessing


@pytest.mark.slow
def test_preprocess_train_evaluate_on_the_real_model(tmp_path, data_dir, real_model_dir):
    processed, out = tmp_path / "processed", tmp_path / "sft"
    splits, stats = preprocess(data_dir, real_model_dir, processed, "--sample_size", 24)
    prompter = prompter_for(processed, real_model_dir)
    assert stats["config"]["thinks"] is False and not prompter.format.thinks
    for split in splits.values():  # labels, eos trained, prompt parity with inference, parse round trip
        for row in split:
            assert test_preprocessing.check_row(row, prompter) == []
            assert row["completion"].startswith("Answer: ") and "</think>" not in row["completion"]

    # bf16 on the CPU, as make demo-real trains: the same path a bf16 GPU takes
    result = run_script("train_sft_example.py", "--data_path", processed, "--model_name_or_path", real_model_dir,
                        "--output_dir", out, "--max_samples", 8, "--batch_size", 4, "--grad_accum", 1,
                        "--learning_rate", 2e-3, "--eval_steps", 1, "--eval_accuracy_samples", 4, "--precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    training = json.loads((out / "eval_results.json").read_text())
    assert training["steps"] == 2 and training["eval_accuracy"] is not None and training["dtype"] == "torch.bfloat16"

    report_path = tmp_path / "eval.json"
    result = run_script("inference_example.py", "--evaluate", "--method", "both", "--compare_base", "--num_samples",
                        6, "--max_new_tokens", 8, "--model_name_or_path", real_model_dir, "--adapter_path",
                        out / "final_model", "--data_path", processed, "--output_file", report_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    results = report["results"]
    assert report["prompt_format"]["thinks"] is False
    assert results["fine_tuned/score"]["n"] == 6
    assert results["base/generate"]["no_answer_within_budget"] == 0  # without a think block, never "still thinking"
    tuned, base = results["fine_tuned/score"]["records"], results["base/score"]["records"]
    changes = [abs(t["option_scores"][letter] - b["option_scores"][letter])
               for t, b in zip(tuned, base) for letter in "ABCD"]
    assert max(changes) > 1e-2  # the adapter was loaded and changes what the model prefers
    assert set(report["paired"]) == {"fine_tuned/score - base/score", "fine_tuned/generate - base/generate"}
