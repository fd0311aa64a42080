"""A shortened `make demo`: if the format, the labels, training or evaluation were wrong, the fine-tuned
tiny model would not beat its base on held-out questions. It runs the demo's own recipe files (the training
is the `demo_run` fixture, which the reasoning-trace round trip reuses)."""
import json
import shlex

import pytest

import inference_example as inference
from conftest import ROOT, run_in_process, run_script

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


@pytest.mark.slow
def test_the_readme_try_next_commands_run_as_written(demo_run):
    """README's commands after the demo, with demo_outputs/ pointing at this run's folders."""
    processed, out = demo_run
    readme = (ROOT / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith(".venv/bin/python inference_example.py")]
    assert len(lines) == 2
    for line in lines:
        line = line.replace("demo_outputs/sft/final_model", str(out / "final_model"))
        line = line.replace("demo_outputs/processed", str(processed))
        result = run_in_process(inference.main, *shlex.split(line)[2:], "--max_new_tokens", 32,
                                stdin="What is shown?\nA: Liver\nB: Spleen\n\n")
        assert result.returncode == 0 and "parsed answer:" in result.stdout, result.stderr[-2000:]
