"""The faults a cluster job meets (run_guard.py), each injected into a real tiny run on one CPU process, in this
interpreter: a stop signal at step k (a fake scontrol records the requeue) and during an evaluation, a full disk
in its three shapes, a NaN loss at step k, two runs into one folder, torn checkpoints, racing writers. The
2-process signal tests are in tests/test_distributed.py."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import transformers
from conftest import ROOT, run_in_process

import common
import run_guard
import train_sft_example as train


def flags(data, model_dir, out, *extra):
    # 24 rows, 4 a step: 6 optimizer steps, a checkpoint every 2 (validation loss picks final_model/)
    return ["--data_path", data, "--model_name_or_path", model_dir, "--output_dir", out, "--max_samples", 24,
            "--max_eval_samples", 8, "--batch_size", 4, "--grad_accum", 1, "--learning_rate", 3e-3,
            "--eval_steps", 2, "--logging_steps", 1, "--eval_accuracy_samples", 0, "--seed", 3, *extra]


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    import torch

    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def error_lines(result):
    # what the run said on stderr, less the model loader's progress bar
    return [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_processed, model_dir):
    """The uninterrupted run every fault is compared with: its output folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_in_process(train.main, *flags(small_processed, model_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def at_step(monkeypatch, step, action):
    """Run action() inside training step `step` (1-based); return the global step each training step began at."""
    began, original = [], transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        began.append(self.state.global_step)
        if self.state.global_step == step - 1:
            action()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    return began


def test_a_stop_signal_saves_that_step_requeues_and_the_resumed_run_ends_on_the_same_adapter(
        tmp_path, reference, small_processed, model_dir, monkeypatch):
    scontrol, log = tmp_path / "bin" / "scontrol", tmp_path / "scontrol.log"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "out"
    at_step(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = run_in_process(train.main, *flags(small_processed, model_dir, out))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in result.stdout
    assert run_guard.checkpoint_fault(out / "checkpoint-3") is None  # saved at the step the signal came in
    assert not (out / "final_model").exists() and not (out / "eval_results.json").exists()
    status = json.loads((out / "run_status.json").read_text())
    assert (status["stopped_by"], status["step"], status["requeued_slurm_job"]) == ("SIGTERM", 3, True)
    assert log.read_text() == "requeue 4242\n"  # once, by the run itself, after the checkpoint was complete

    began = at_step(monkeypatch, 0, lambda: None)
    resumed = run_in_process(train.main, *flags(small_processed, model_dir, out, "--resume_from_checkpoint", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert began == [3, 4, 5]  # no step redone, none skipped
    assert_same_adapter(adapter(out / "final_model"), adapter(reference / "final_model"))
    assert log.read_text() == "requeue 4242\n"  # a finished run does not requeue
    for folder in (out / "final_model", out / "checkpoint-3"):  # readable by a colleague, as the JSON beside it
        assert (folder / "adapter_model.safetensors").stat().st_mode == (folder / "adapter_config.json").stat().st_mode


def test_a_stop_signal_during_an_evaluation_abandons_it_and_saves_the_step(tmp_path, small_processed, model_dir,
                                                                         monkeypatch):
    original = transformers.Trainer.prediction_step

    def prediction_step(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "prediction_step", prediction_step)
    out = tmp_path / "out"
    result = run_in_process(train.main, *flags(small_processed, model_dir, out))
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert not any("eval_loss" in entry for entry in state["log_history"]) and state["best_global_step"] is None
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_nan_loss_stops_before_the_optimizer_step_with_status_4(tmp_path, small_processed, model_dir,
                                                                  monkeypatch):
    original = transformers.Trainer.compute_loss

    def compute_loss(self, model, *args, **kwargs):
        loss = original(self, model, *args, **kwargs)
        nan = model.training and self.state.global_step == 2  # training step 3, not the evaluation at step 2
        return loss * float("nan") if nan else loss

    monkeypatch.setattr(transformers.Trainer, "compute_loss", compute_loss)
    out = tmp_path / "out"
    result = run_in_process(train.main, *flags(small_processed, model_dir, out))
    lines = error_lines(result)
    assert result.returncode == 4 and len(lines) == 1, result.stderr[-3000:]
    assert "at step 3" in lines[0] and f"resumes from {out / 'checkpoint-2'}" in lines[0]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert run_guard.checkpoint_fault(out / "checkpoint-2") is None  # finite weights
    assert not (out / "final_model").exists()


def fail_safetensors_in_checkpoint_4(monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError

    original = peft.peft_model.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise SafetensorError("No space left on device (os error 28)")  # as safetensors says it: no file left
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


def fail_torch_save_in_checkpoint_4(monkeypatch):
    import torch

    original = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 a partial zip")  # torch.save leaves what it wrote
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 3967")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def fail_quota_in_final_model(monkeypatch):
    original = transformers.PreTrainedTokenizerBase.save_pretrained

    def save_pretrained(self, directory, *args, **kwargs):
        if str(directory).endswith("final_model.incomplete"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("inject, error, resume_step", [
    (fail_safetensors_in_checkpoint_4, "SafetensorError ENOSPC", 2),
    (fail_torch_save_in_checkpoint_4, "RuntimeError from torch.save", 2),
    (fail_quota_in_final_model, "OSError EDQUOT", 6),
], ids=["safetensors", "torch.save", "quota"])
def test_a_full_disk_ends_in_one_line_with_status_3_and_loses_nothing_complete(
        tmp_path, reference, small_processed, model_dir, monkeypatch, inject, error, resume_step):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(reference / "final_model", out / "final_model")  # a previous run's, which must survive
    inject(monkeypatch)
    result = run_in_process(train.main, *flags(small_processed, model_dir, out))
    lines = error_lines(result)
    assert result.returncode == 3 and len(lines) == 1, result.stderr[-3000:]
    assert str(out) in lines[0] and error in lines[0] and " free)" in lines[0]
    assert f"resumes from {out / f'checkpoint-{resume_step}'}" in lines[0]
    steps = sorted(run_guard.step_of(p) for p in out.glob("checkpoint-*"))
    assert steps == list(range(2, resume_step + 1, 2))  # the torn one removed, every complete one kept
    assert all(run_guard.checkpoint_fault(out / f"checkpoint-{step}") is None for step in steps)
    assert not list(out.glob("*.incomplete")) and not list(out.glob("*.previous"))
    assert_same_adapter(adapter(out / "final_model"), adapter(reference / "final_model"))


def test_a_second_run_into_a_held_folder_exits_2_naming_the_holder(tmp_path, small_processed, model_dir,
                                                                    monkeypatch):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                               "import run_guard; run_guard.RunLock(sys.argv[1]).acquire(); time.sleep(60)",
                               str(out), str(ROOT)], env={**os.environ, "SLURM_JOB_ID": "77"})
    try:
        deadline = time.time() + 30
        while run_guard.RunLock(out).holder().get("pid") != holder.pid and time.time() < deadline:
            time.sleep(0.05)
        start = time.time()
        result = run_in_process(train.main, *flags(small_processed, model_dir, out))
        lines = error_lines(result)
        assert result.returncode == 2 and len(lines) == 1 and time.time() - start < 10, result.stderr[-3000:]
        assert all(word in lines[0] for word in (f"pid {holder.pid}", "SLURM job 77", "started", "host"))
        assert not list(out.glob("checkpoint-*"))

        monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued, while the old holder seems alive
        requeued = run_guard.RunLock(out)
        requeued.acquire()
        requeued.release()
        monkeypatch.delenv("SLURM_JOB_ID")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    dead_holders = run_guard.RunLock(out)  # a holder killed with -9 leaves its file, not its lock
    dead_holders.acquire()
    dead_holders.release()


def test_torn_checkpoints_are_set_aside_and_never_chosen_and_a_non_finite_one_is_refused(tmp_path, reference):
    from safetensors.torch import save_file

    out = tmp_path / "out"
    for step in (2, 4, 6, 8):
        shutil.copytree(reference / f"checkpoint-{min(step, 6)}", out / f"checkpoint-{step}")
    state = (out / "checkpoint-4" / "trainer_state.json").read_text()
    (out / "checkpoint-4" / "trainer_state.json").write_text(state[:len(state) // 2])  # present, not whole
    weights = (out / "checkpoint-6" / "adapter_model.safetensors").read_bytes()
    (out / "checkpoint-6" / "adapter_model.safetensors").write_bytes(weights[:len(weights) // 2])
    nan = {name: tensor * float("nan") for name, tensor in adapter(out / "checkpoint-8").items()}
    save_file(nan, out / "checkpoint-8" / "adapter_model.safetensors")
    with pytest.raises(common.UsageError, match="non-finite"):
        train.resolve_checkpoint(str(out / "checkpoint-8"), out)
    assert train.resolve_checkpoint("auto", out) == str(out / "checkpoint-2")
    run_guard.set_aside_torn(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "torn-checkpoint-4", "torn-checkpoint-6",
                                                    "torn-checkpoint-8"]
    assert_same_adapter(adapter(out / "checkpoint-2"), adapter(reference / "checkpoint-2"))


def test_two_writers_of_one_file_never_collide(tmp_path):
    path, errors = tmp_path / "report.json", []

    def write(text):
        try:
            for _ in range(200):
                common.write_text_atomic(path, text)
        except OSError as err:
            errors.append(err)

    writers = [threading.Thread(target=write, args=(text * 1000,)) for text in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert not errors and path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind
