"""The fault table of README.md ("Reliability"): each fault a cluster job meets, injected into a real tiny run
(train_sft_example.main in this process, 6 steps, a checkpoint every 2), then the run resumed with
--resume_from_checkpoint auto and compared with an uninterrupted run.

    .venv/bin/python bench/fault_table.py            # ~2 minutes on 2 cores; the tmpfs row needs root

Per fault: injections, runs that survived (the expected exit status and one line, every checkpoint complete
before the fault still complete, the resumed run finishing), training steps redone on resume (steps the cut run
had begun past its resume point), complete checkpoints lost, and whether the resumed run's final adapter equals
the uninterrupted run's. Its working files go to bench/results/faults.
"""
import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest.mock
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import common  # noqa: E402
import preprocess_pmc_vqa_for_sft  # noqa: E402
import run_guard  # noqa: E402
import train_sft_example as train  # noqa: E402

WORK = ROOT / "bench" / "results" / "faults"
MODEL = ROOT / "demo_assets" / "tiny-r1-llama"


def flags(out, *extra):
    return ["--data_path", WORK / "data", "--model_name_or_path", MODEL, "--output_dir", out, "--max_samples", 24,
            "--max_eval_samples", 8, "--batch_size", 4, "--grad_accum", 1, "--learning_rate", 3e-3, "--eval_steps",
            2, "--logging_steps", 1, "--eval_accuracy_samples", 0, "--seed", 3, *extra]


def run(out, *extra, patches=()):
    """(exit status, stderr, the global step each training step began at) of one in-process run."""
    began, step = [], transformers.Trainer.training_step

    def recording(self, *args, **kwargs):
        began.append(self.state.global_step)
        return step(self, *args, **kwargs)

    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(unittest.mock.patch.object(transformers.Trainer, "training_step", recording))
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            common.run_main(lambda: train.main([str(a) for a in flags(out, *extra)]))
            status = 0
        except SystemExit as exited:
            status = exited.code or 0
    return status, err.getvalue(), began


def same_adapter(a, b):
    a, b = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def complete(out):
    return {p.name for p in run_guard.complete_checkpoints(out)}


def at_step(k, action):
    """A patch that runs action() inside training step k (1-based)."""
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == k - 1:
            action()
        return original(self, *args, **kwargs)

    return unittest.mock.patch.object(transformers.Trainer, "training_step", training_step)


def nan_loss_at(k):
    original = transformers.Trainer.compute_loss

    def compute_loss(self, model, *args, **kwargs):
        loss = original(self, model, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step == k - 1 else loss

    return unittest.mock.patch.object(transformers.Trainer, "compute_loss", compute_loss)


def failing(target, name, when, exception, partial=False):
    original = getattr(target, name)

    def write(*args, **kwargs):
        path = str(args[1] if len(args) > 1 else kwargs.get("f", ""))
        if when(path, args):
            if partial:
                Path(path).write_bytes(b"PK\x03\x04 partial")
            raise exception
        return original(*args, **kwargs)

    return unittest.mock.patch.object(target, name, write)


def inject(name, out, patches, status_expected, line_words=()):
    """Run a cut run with patches, then resume; one row's measurements."""
    before = []
    original_save = transformers.Trainer._save_checkpoint

    def recording_save(self, *args, **kwargs):  # the checkpoints the cut run completed, in order
        original_save(self, *args, **kwargs)
        before.append(f"checkpoint-{self.state.global_step}")

    status, err, began = run(out, patches=[*patches, unittest.mock.patch.object(
        transformers.Trainer, "_save_checkpoint", recording_save)])
    lines = [line for line in err.splitlines() if line.startswith("error")]
    ok = status == status_expected and all(w in err for w in line_words) and len(lines) <= 1
    lost = len(set(before) - complete(out))
    resume_from = max((run_guard.step_of(p) for p in run_guard.complete_checkpoints(out)), default=0)
    return ok, began, lost, resume_from


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        preprocess_pmc_vqa_for_sft.main(["--data_path", str(ROOT / "demo_assets" / "PMC-VQA"), "--model_name_or_path",
                                         str(MODEL), "--output_dir", str(WORK / "data"), "--sample_size", "64",
                                         "--num_proc", "1"])
    start = time.time()
    reference = WORK / "reference"
    assert run(reference)[0] == 0
    rows = {}

    def record(fault, out, patches, status, words=(), fix=lambda: None):
        ok, began, lost, resume_from = inject(fault, out, patches, status, words)
        fix()
        resumed, _, _ = run(out, "--resume_from_checkpoint", "auto")
        row = rows.setdefault(fault, [0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += ok and resumed == 0
        row[2] += (max(began) + 1 - resume_from) if began else 0
        row[3] += lost
        row[4] += resumed == 0 and same_adapter(out / "final_model", reference / "final_model")

    for k in (3, 5):
        record("SIGTERM at step k (k = 3, 5)", WORK / f"sigterm-{k}",
               [at_step(k, lambda: os.kill(os.getpid(), signal.SIGTERM))], 128 + signal.SIGTERM)
    import peft.peft_model

    record("full disk: SafetensorError ENOSPC", WORK / "safetensors",
           [failing(peft.peft_model, "safe_save_file", lambda path, a: "checkpoint-4" in path,
                    SafetensorError("No space left on device (os error 28)"))], 3, ["ENOSPC"])
    record("full disk: torch.save RuntimeError", WORK / "torch-save",
           [failing(torch, "save", lambda path, a: "checkpoint-4" in path and path.endswith("optimizer.pt"),
                    RuntimeError("unexpected pos 4096 vs 3967"), partial=True)], 3, ["torch.save"])
    record("quota: OSError EDQUOT in final_model", WORK / "quota",
           [failing(transformers.PreTrainedTokenizerBase, "save_pretrained",
                    lambda path, a: path.endswith("final_model.incomplete"),
                    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))], 3, ["EDQUOT"])
    if os.geteuid() == 0:  # a real full disk: a 5 MB tmpfs holds two of the three checkpoints, then grows
        disk = WORK / "tmpfs"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], check=True)
        try:
            record("full disk: a 5 MB tmpfs", disk / "out", [], 3, ["free"],
                   fix=lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True))
        finally:
            subprocess.run(["umount", str(disk)], check=True)
    record("NaN loss at step 3", WORK / "nan", [nan_loss_at(3)], 4, ["non-finite"])

    held = WORK / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                               "import run_guard; run_guard.RunLock(sys.argv[1]).acquire(); time.sleep(60)",
                               str(held), str(ROOT)])
    try:
        deadline = time.time() + 30
        while run_guard.RunLock(held).holder().get("pid") != holder.pid and time.time() < deadline:
            time.sleep(0.05)
        status, err, _ = run(held)
        rows["second run into a held folder"] = [1, int(status == 2 and f"pid {holder.pid}" in err), 0, 0, None]
    finally:
        holder.kill()
        holder.wait(timeout=30)

    print("| fault | injections | survived | steps redone on resume | complete checkpoints lost | final adapter = "
          "uninterrupted run |")
    print("|---|---|---|---|---|---|")
    for fault, (n, survived, redone, lost, same) in rows.items():
        equal = "n/a (refused at start)" if same is None else f"{same} of {n}"
        print(f"| {fault} | {n} | {survived} | {redone} | {lost} | {equal} |")
    print(f"\n({time.time() - start:.0f} s; tiny model, 6 steps of 4 rows, a checkpoint every 2 steps, one CPU process)")


if __name__ == "__main__":
    main()
