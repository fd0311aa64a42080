"""Training: loss only on answers, packing without cross-talk, accuracy picks the checkpoint, 4-bit, DDP on CPU,
resume, outputs, errors."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train_sft_example as train
from conftest import ROOT, free_port, run_script


def train_flags(data, model_dir, out, *extra):
    return ["--data_path", data, "--model_name_or_path", model_dir, "--output_dir", out, "--batch_size", 4,
            "--grad_accum", 1, "--learning_rate", 3e-3, "--eval_steps", 4, "--logging_steps", 2,
            *extra]


def lora_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


def test_packed_loss_equals_padded_loss_on_the_same_rows(small_processed, model_dir):
    import torch

    args = train.parse_args(["--model_name_or_path", str(model_dir), "--data_path", str(small_processed)])
    model, tokenizer = train.setup_model_and_tokenizer(args, torch.float32)
    dataset, _, _ = train.load_processed_dataset(small_processed, 6)
    losses = {}
    for packing in (False, True):
        args.packing = packing
        collator = train.build_trainer(args, model, tokenizer, dataset, dataset, {"use_cpu": True}).data_collator
        batch = collator(dataset.to_list())
        assert ("position_ids" in batch and batch["input_ids"].shape[0] == 1) == packing
        with torch.no_grad():
            losses[packing] = model(**batch, use_cache=False).loss.item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_training_writes_every_promised_output(tmp_path, small_processed, model_dir):
    out = tmp_path / "sft"
    result = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, out, "--max_samples", 32,
                                                             "--merge", "--early_stopping_patience", 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable parameters:" in result.stdout and "effective batch 4 x 1 x 1" in result.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "README.md"):
        assert (out / "final_model" / name).exists(), name
    assert (out / "merged_model" / "model.safetensors").exists()
    assert (out / "loss_curve.png").stat().st_size > 1000
    metrics = json.loads((out / "eval_results.json").read_text())
    assert {"eval_loss", "perplexity", "eval_accuracy", "best_model_metric", "best_metric", "train_loss", "steps",
            "tokens_seen", "tokens_per_second", "peak_rss_gb"} <= set(metrics)
    assert metrics["steps"] == 8 and metrics["tokens_seen"] > 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert any("eval_loss" in entry for entry in summary["log_history"])
    assert not list(out.glob("*.incomplete"))


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_the_best_checkpoint_follows_the_chosen_validation_metric(tmp_path, small_processed, model_dir, metric):
    out = tmp_path / metric
    result = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, out, "--max_samples", 32,
                                                             "--eval_steps", 2,
                                                             "--eval_accuracy_samples", 16,
                                                             "--metric_for_best_model", metric))
    assert result.returncode == 0, result.stderr[-3000:]
    *evaluations, final = [e for e in json.loads((out / "training_summary.json").read_text())["log_history"]
                           if "eval_loss" in e]  # one per eval_steps, then the best model's, re-evaluated
    assert len(evaluations) == 4 and all(0 <= e["eval_accuracy"] <= 1 for e in evaluations)
    assert result.stdout.count("validation accuracy") >= 4 and "scored in" in result.stdout
    values = [e[f"eval_{metric}"] for e in evaluations]
    best = (max if metric == "accuracy" else min)(values)
    first_best_step = evaluations[values.index(best)]["step"]  # Trainer keeps the first of equal values
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["best_model_metric"] == metric and metrics["best_metric"] == pytest.approx(best)
    assert metrics["best_checkpoint"].endswith(f"checkpoint-{first_best_step}")
    assert final[f"eval_{metric}"] == metrics[f"eval_{metric}"] == pytest.approx(best, abs=1e-4)  # that checkpoint


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu_and_refuses_to_merge(tmp_path, small_processed, model_dir):
    out = tmp_path / "q"
    result = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, out, "--max_samples", 16,
                                                             "--load_in_4bit", "--gradient_checkpointing"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = lora_weights(out / "final_model")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in weights.items())  # B starts at 0
    refused = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, out, "--load_in_4bit",
                                                              "--merge"))
    assert refused.returncode == 2 and "16-bit" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_two_process_ddp_on_cpu_shards_data_and_syncs_gradients(tmp_path, small_processed, model_dir):
    out, probe = tmp_path / "ddp", tmp_path / "probe"
    probe.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()),
               str(ROOT / "tests" / "ddp_probe.py"), str(probe),
               *map(str, train_flags(small_processed, model_dir, out, "--max_samples", 32))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["ddp"] == "DistributedDataParallel" for rank in ranks)
    seen = [{tuple(ids) for ids in rank["seen"]} for rank in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]      # each rank trained on its own shard
    assert len(seen[0] | seen[1]) == 32                        # together, all rows
    assert ranks[0]["lora"] == ranks[1]["lora"]                # gradients were averaged: identical weights
    assert result.stdout.count("trainable parameters:") == 1   # rank 0 alone reports and writes
    assert (out / "final_model" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, small_processed, model_dir):
    import torch

    flags = ["--max_samples", 48, "--seed", 3]
    whole = tmp_path / "whole"
    assert run_script("train_sft_example.py", *train_flags(small_processed, model_dir, whole, *flags)).returncode == 0

    cut = tmp_path / "cut"
    cmd = [sys.executable, str(ROOT / "train_sft_example.py"), *map(str, train_flags(small_processed, model_dir, cut,
                                                                                      *flags))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint-4" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "final_model").exists() and not (cut / "eval_results.json").exists()

    resumed = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, cut, *flags,
                                                              "--resume_from_checkpoint", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = lora_weights(whole / "final_model"), lora_weights(cut / "final_model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_auto_resume_skips_a_checkpoint_whose_save_never_finished(tmp_path):
    for step, complete in ((4, True), (8, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert train.resolve_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-4")
    shutil.rmtree(tmp_path / "checkpoint-4")
    assert train.resolve_checkpoint("auto", tmp_path) is None


def test_a_split_without_trainable_tokens_is_refused(tmp_path, small_processed, model_dir):
    from datasets import load_from_disk

    splits = load_from_disk(str(small_processed))
    splits["validation"] = splits["validation"].map(lambda row: {"labels": [-100] * len(row["labels"])})
    splits.save_to_disk(tmp_path / "masked")
    result = run_script("train_sft_example.py", *train_flags(tmp_path / "masked", model_dir, tmp_path / "o"))
    assert result.returncode == 2 and "no trainable tokens" in result.stderr and "Traceback" not in result.stderr
