"""Training on one process: loss only on answers, packing without cross-talk, the checkpoint the chosen metric
picks really becomes final_model/, early stopping, 4-bit, merging, resume after a kill, outputs."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, prompter_for, run_probe, run_script

import train_sft_example as train


def train_flags(data, model_dir, out, *extra):
    return ["--data_path", data, "--model_name_or_path", model_dir, "--output_dir", out, "--batch_size", 4,
            "--grad_accum", 1, "--learning_rate", 3e-3, "--eval_steps", 4, "--logging_steps", 2,
            "--eval_accuracy_samples", 8, *extra]


def lora_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def same_weights(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_packed_loss_equals_padded_loss_on_the_same_rows(small_processed, model_dir):
    import torch

    args = train.parse_args(["--model_name_or_path", str(model_dir), "--data_path", str(small_processed)])
    prompter = prompter_for(small_processed, model_dir)
    model = train.setup_model(args, torch.float32, vlm=False)
    dataset, _, _ = train.load_processed_dataset(small_processed, 6, 0, prompter.training_columns)
    losses = {}
    for packing in (False, True):
        batch = prompter.collator(packing)(dataset.to_list())
        assert ("position_ids" in batch and batch["input_ids"].shape[0] == 1) == packing
        with torch.no_grad():
            losses[packing] = model(**batch, use_cache=False).loss.item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_checkpoint_accuracy_is_scored_on_validation_questions_only(small_processed):
    from datasets import load_from_disk

    splits = load_from_disk(str(small_processed))
    train_rows, _, questions = train.load_processed_dataset(small_processed, None, 8,
                                                            ["input_ids", "attention_mask", "labels"])
    assert [q["id"] for q in questions] == splits["validation"]["id"][:8]
    assert len(train_rows) == len(splits["train"])  # and never taken out of the rows trained on


def test_the_chosen_metric_and_direction_reach_the_trainer(small_processed, model_dir):
    for flags, metric, greater in (([], "accuracy", True), (["--metric_for_best_model", "loss"], "loss",
                                                                 False),
                                   (["--eval_accuracy_samples", "0"], "loss", False)):
        args = train.parse_args(["--data_path", str(small_processed), *flags])
        training_args = train.training_arguments(args, {"use_cpu": True})
        assert (training_args.metric_for_best_model, training_args.greater_is_better) == (metric, greater)
        assert training_args.load_best_model_at_end and training_args.save_steps == training_args.eval_steps


def test_training_writes_every_promised_output_and_merges_exactly(tmp_path, small_processed, model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    result = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, out, "--max_samples", 16,
                                                             "--merge"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable parameters:" in result.stdout
    assert "global batch 4 per device x 1 accumulation x 1 processes = 4 rows" in result.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "README.md"):
        assert (out / "final_model" / name).exists(), name
    assert f"--data_path {small_processed}" in (out / "final_model" / "README.md").read_text()
    assert (out / "loss_curve.png").stat().st_size > 1000
    metrics = json.loads((out / "eval_results.json").read_text())
    assert {"eval_loss", "perplexity", "eval_accuracy", "best_model_metric", "best_metric", "best_step",
            "train_loss", "steps", "tokens_seen", "tokens_per_second", "peak_rss_gb"} <= set(metrics)
    assert metrics["steps"] == 4 and metrics["tokens_seen"] > 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert any("eval_loss" in entry for entry in summary["log_history"])
    assert not list(out.glob("*.incomplete"))
    # merged_model/ is the base with the adapter folded in: the adapted model's logits, not the base's
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "final_model")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged_model")(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-5) and not torch.allclose(merged, plain, atol=1e-3)


@pytest.mark.slow
def test_the_best_checkpoint_becomes_final_model_and_early_stopping_stops(tmp_path, small_processed, model_dir):
    out = tmp_path / "sft"
    # validation accuracy 0.5, 0.9 (best, at step 4), 0.6, 0.7: patience 2 stops the 12-step run at step 8
    report = run_probe(tmp_path / "probe", train_flags(small_processed, model_dir, out, "--max_samples", 48,
                                                       "--eval_steps", 2, "--early_stopping_patience", 2),
                       env={"PROBE_ACCURACY": "0.5,0.9,0.6,0.7,0.8,0.95"})[0]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert max(report["steps"]) == 7 and metrics["steps"] == 8  # stopped early: 8 of 12 steps
    assert metrics["best_step"] == 4 and metrics["eval_accuracy"] == 0.9 and metrics["best_metric"] == 0.9
    assert metrics["best_checkpoint"].endswith("checkpoint-4")
    final = lora_weights(out / "final_model")
    assert same_weights(final, lora_weights(out / "checkpoint-4"))      # the best was restored and saved ...
    assert not same_weights(final, lora_weights(out / "checkpoint-8"))  # ... not the last


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(tmp_path, small_processed, model_dir):
    out = tmp_path / "q"
    result = run_script("train_sft_example.py", *train_flags(small_processed, model_dir, out, "--max_samples", 8,
                                                             "--load_in_4bit", "--gradient_checkpointing"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gemm_4bit" not in result.stderr and "is_gradient_checkpointing" not in result.stderr  # quiet console
    weights = lora_weights(out / "final_model")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in weights.items())  # B starts at 0


@pytest.mark.slow
def test_resume_after_a_kill_starts_at_the_checkpoint_and_ends_where_an_uninterrupted_run_ends(
        tmp_path, small_processed, model_dir):
    flags = ["--max_samples", 48, "--seed", 3]
    whole = tmp_path / "whole"
    uninterrupted = run_probe(tmp_path / "whole-probe", train_flags(small_processed, model_dir, whole, *flags))[0]

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
    for later in cut.glob("checkpoint-*"):  # a kill during a later save leaves a checkpoint auto must skip
        if later.name != "checkpoint-4":
            shutil.rmtree(later)

    resumed = run_probe(tmp_path / "cut-probe", train_flags(small_processed, model_dir, cut, *flags,
                                                            "--resume_from_checkpoint", "auto"))[0]
    assert resumed["steps"] == list(range(4, 12))  # began at the checkpoint's step and ran only what was left
    assert resumed["seen"] == uninterrupted["seen"][16:]  # on the rows the uninterrupted run saw after step 4
    assert same_weights(lora_weights(whole / "final_model"), lora_weights(cut / "final_model"))


def test_resume_picks_the_newest_complete_checkpoint_or_the_one_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    for step, complete in ((4, True), (12, True), (8, True), (16, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"lora_A": torch.ones(2)}, folder / "adapter_model.safetensors")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert train.resolve_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-12")
    assert train.resolve_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path) == str(tmp_path / "checkpoint-4")
    assert train.resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(train.UsageError, match="not a complete checkpoint"):
        train.resolve_checkpoint(str(tmp_path / "checkpoint-16"), tmp_path)
    for step in (4, 8, 12):
        shutil.rmtree(tmp_path / f"checkpoint-{step}")
    assert train.resolve_checkpoint("auto", tmp_path) is None


def test_an_adapter_less_folder_is_never_kept(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="was not kept"):
        train.check_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(SystemExit, match="missing or empty"):
        train.check_adapter(tmp_path)
