"""A shortened `make demo`: if the format, the labels, training or evaluation were wrong, the fine-tuned
tiny model would not beat its base on held-out questions. It runs the demo's own recipe files."""
import json

import pytest

import build_demo_assets as bda
from conftest import run_script


@pytest.mark.slow
def test_shortened_demo_clearly_beats_the_base(tmp_path, data_dir, model_dir):
    processed, out = tmp_path / "processed", tmp_path / "sft"
    steps = [
        ("preprocess_pmc_vqa_for_sft.py", "--data_path", data_dir, "--model_name_or_path", model_dir,
         "--output_dir", processed, bda.DEMO_RECIPES["preprocess"]),
        ("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model_dir, "--output_dir", out,
         bda.DEMO_RECIPES["train"], "--max_samples", 1600),
        ("inference_example.py", "--evaluate", "--method", "both", "--compare_base", "--num_samples", 100,
         "--model_name_or_path", model_dir, "--adapter_path", out / "final_model", "--data_path", processed),
    ]
    for script, *args in steps:
        result = run_script(script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    training = json.loads((out / "eval_results.json").read_text())
    assert training["best_model_metric"] == "accuracy" and training["eval_accuracy"] > 0.5
    assert training["best_checkpoint"], "the best checkpoint was not saved, so final_model/ is not the best"
    report = json.loads((out / "final_model" / "evaluation_results.json").read_text())
    results = report["results"]
    accuracy = {name: r["accuracy"] for name, r in results.items()}
    assert accuracy["base/score"] < 0.45, accuracy
    assert accuracy["fine_tuned/score"] >= accuracy["base/score"] + 0.3, accuracy
    assert accuracy["fine_tuned/generate"] >= accuracy["base/generate"] + 0.3, accuracy
    # the fine-tune also beats the majority-letter line by a clear margin, and its low CI bound clears chance
    assert results["fine_tuned/score"]["ci95"][0] > results["fine_tuned/score"]["majority_letter_baseline"]
    assert report["paired"]["fine_tuned/score - base/score"]["mcnemar_exact_p"] < 0.001
