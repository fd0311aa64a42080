"""The GPU tier (`make gpu-check` runs it after bench/bench_gpu.py): bf16 LoRA with packing trains to the
padded run's loss, 4-bit QLoRA trains, and option scoring agrees with generation on the demo fine-tune.
Every test here skips cleanly without CUDA; bench_gpu.py's CPU path is tested in every run."""
import json

import pytest
from conftest import ROOT, run_script

import build_demo_assets as bda

torch = pytest.importorskip("torch")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(processed, model_dir, out, *flags):
    result = run_script("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model_dir,
                        "--output_dir", out, "--batch_size", 8, "--grad_accum", 1, "--learning_rate", 3e-3,
                        "--eval_steps", 5, "--logging_steps", 1, "--eval_accuracy_samples", 16,
                        *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "training_summary.json").read_text())


@pytest.mark.gpu
@needs_cuda
def test_packed_bf16_lora_trains_to_the_padded_loss(tmp_path, small_processed, model_dir):
    losses = {}
    for packing in (False, True):
        summary = train(small_processed, model_dir, tmp_path / str(packing), "--max_samples", 80, "--seed", 1,
                        *(["--packing"] if packing else []))
        assert summary["metrics"]["dtype"] == "torch.bfloat16" and summary["metrics"]["steps"] == 10
        losses[packing] = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert losses[True] == pytest.approx(losses[False], rel=3e-2)  # bf16: same rows, same order, same loss


@pytest.mark.gpu
@needs_cuda
def test_qlora_4bit_trains_on_the_gpu(tmp_path, small_processed, model_dir):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    train(small_processed, model_dir, tmp_path / "q", "--max_samples", 40, "--load_in_4bit",
          "--gradient_checkpointing")
    weights = load_file(tmp_path / "q" / "final_model" / "adapter_model.safetensors")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in weights.items())


@pytest.mark.gpu
@needs_cuda
def test_scoring_agrees_with_generation_on_the_demo_fine_tune(tmp_path, data_dir, model_dir):
    processed, out = tmp_path / "processed", tmp_path / "sft"
    for script, *args in [
        ("preprocess_pmc_vqa_for_sft.py", "--data_path", data_dir, "--model_name_or_path", model_dir,
         "--output_dir", processed, bda.DEMO_RECIPES["preprocess"]),
        ("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model_dir, "--output_dir", out,
         bda.DEMO_RECIPES["train"], "--max_samples", 1600),
        ("inference_example.py", "--evaluate", "--method", "both", "--num_samples", 100, "--model_name_or_path",
         model_dir, "--adapter_path", out / "final_model", "--data_path", processed)]:
        result = run_script(script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    report = json.loads((out / "final_model" / "evaluation_results.json").read_text())
    assert report["agreement"]["fine_tuned"]["score"]["generate"] >= 0.9


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_on_the_tiny_shape(tmp_path):
    rows = {"lora", "packing", "4bit", "score", "letter", "generate32", "vlm_lora", "vlm_score"}
    result = run_script("bench/bench_gpu.py", "--shape", "tiny", "--configs", *sorted(rows))
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((ROOT / "bench" / "results" / "gpu_tiny.json").read_text())
    assert set(table["rows"]) == rows
    for name, row in table["rows"].items():
        assert row["status"] == "ok" or row["status"].startswith("not available"), (name, row)
    assert table["rows"]["lora"]["tokens_per_second"] > 0 and table["rows"]["lora"]["hours_per_v1_epoch"] > 0
    assert 0 < table["rows"]["lora"]["evaluation_share"] < 1  # hours per epoch include the recipe's evaluations
    assert table["rows"]["score"]["questions_per_second"] > 0 and table["rows"]["vlm_score"]["questions_per_second"] > 0
    assert table["rows"]["vlm_lora"]["image_tokens_per_second"] > 0  # the tiny VLM's figures are counted apart
    assert "config" in result.stdout and "h/epoch v1" in result.stdout
