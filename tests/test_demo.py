"""A shortened `make demo`: if the format, the labels, training or evaluation were wrong, the fine-tuned
tiny model would not beat its base on held-out questions. It runs the demo's own recipe files (the training
is the `demo_run` fixture, which the reasoning-trace round trip reuses)."""
import json

import pytest
from conftest import run_script

# one xdist worker runs this file, so its shared fixtures are built once (make test: -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("demo")


@pytest.mark.slow
def test_shortened_demo_clearly_beats_the_base(demo_run, model_dir):
    processed, out = demo_run
    result = run_script("inference_example.py", "--evaluate", "--method", "both", "--compare_base", "--num_samples",
                        60, "--model_name_or_path", model_dir, "--adapter_path", out / "final_model", "--data_path",
                        processed)
    assert result.returncode == 0, result.stderr[-3000:]
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
