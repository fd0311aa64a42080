"""The faults a cluster job meets, each ending the run cleanly with nothing complete lost. train_sft_example.py
uses it through RunGuard: one object made in main(), its Trainer callback, and `with guard.watch(trainer):`.

    exit 128 + N  a stop signal N (SIGTERM: a SLURM time limit, a preemption, scancel; or SIGUSR1, which
                  `sbatch --signal` can send): the ranks agree at the next step boundary, save one checkpoint at
                  that step, write run_status.json, requeue a SLURM job, and write no final_model/ and no reports
    exit 3        a full disk or quota while saving: one line (folder, error, free space, the checkpoint a rerun
                  resumes from); the torn folder is removed, complete checkpoints and final_model/ stay
    exit 4        a non-finite gradient norm, caught before the optimizer step: no checkpoint holds its weights
    exit 2        a second run into an output folder that a live run holds (run.lock names the holder)

Facts this rests on (torch 2.13, transformers 5.24, accelerate 1.15, safetensors 0.8):
- Trainer saves a checkpoint as: adapter, optimizer.pt (torch.save), scheduler, RNG states, trainer_state.json
  (a plain write) last, then rotation. Nothing is staged, so a kill or a full disk leaves a torn checkpoint-N.
  Rotation (save_total_limit) counts every checkpoint-* folder, torn ones too, and when their mtimes lie within
  a second it sorts by number: it can keep a torn folder and delete complete ones. Torn folders are therefore
  renamed at start to a name rotation does not glob (torn-checkpoint-N).
- A full disk surfaces in three shapes: OSError ENOSPC, or EDQUOT (errno 122) on a quota, which statvfs cannot
  foresee; safetensors' SafetensorError "... (os error 28)", not an OSError; torch.save's RuntimeError
  ("unexpected pos", "file write failed"), which leaves a partial file and loses the errno.
- Trainer's logging_nan_inf_filter (on by default) logs an average in place of a NaN loss while training goes
  on into NaN weights. The gradient norm Trainer computes before the optimizer step is global (after DDP's
  all-reduce, or FSDP's sharded norm), so a check on it stops every rank alike with no extra collective.
- torchrun and `accelerate launch` pass SIGTERM to every worker, then SIGKILL them after --shutdown-timeout
  (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s): the checkpoint save must fit in it. A SLURM job that reaches
  its time limit is never requeued by SLURM; it must run `scontrol requeue` itself.
- safetensors 0.8 writes every *.safetensors with mode 0600 whatever the umask.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import common
from common import UsageError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_DISK_FULL, EXIT_NON_FINITE = 3, 4
LOCK, STATUS = "run.lock", "run_status.json"
TORN = "torn-"  # prefix of a set-aside checkpoint: Trainer's rotation and resume only see checkpoint-*
STORAGE_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}
REPLACED_FOLDERS = ("final_model", "merged_model")


class Stopped(Exception):
    """Every rank agreed on a stop signal and the checkpoint of this step is complete."""


class NonFinite(Exception):
    """The gradient norm of a step is NaN or infinite; the optimizer has not stepped."""


class EvaluationAbandoned(Exception):
    """A stop signal arrived during an evaluation."""


def is_main_process():
    # torchrun and accelerate launch set RANK before any process group exists; a plain python run has none
    return os.environ.get("RANK", "0") == "0"


def match_umask(folder):
    """Give the folder's *.safetensors the mode their JSON neighbours got from the umask (safetensors writes
    0600, so a colleague could not read the adapter)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).glob("*.safetensors"):
        os.chmod(path, 0o666 & ~mask)


def checkpoint_fault(folder):
    """Why folder is no checkpoint to resume from (a sentence), or None when it is complete: its state file is
    whole JSON (written last: whole means the save finished) and its adapter loads, with finite weights."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "its trainer_state.json is missing or not whole JSON"
    if not isinstance(state, dict) or "global_step" not in state:
        return "its trainer_state.json is not a Trainer state"
    try:
        weights = load_file(folder / "adapter_model.safetensors")
    except (OSError, SafetensorError) as err:
        return f"its adapter_model.safetensors does not load ({err})"
    if not weights:
        return "its adapter_model.safetensors holds no tensor"
    if not all(torch.isfinite(tensor).all() for tensor in weights.values()):
        return "its adapter holds non-finite weights"
    return None


def step_of(folder):
    return int(Path(folder).name.rsplit("-", 1)[-1])


def complete_checkpoints(output_dir):
    """The complete checkpoint-N folders of output_dir, oldest step first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit() and not checkpoint_fault(p)]
    return sorted(found, key=step_of)


def resume_hint(output_dir):
    complete = complete_checkpoints(output_dir)
    return f"resumes from {complete[-1]}" if complete else "starts fresh (no complete checkpoint)"


def set_aside_torn(output_dir):
    """Rename every torn checkpoint-N to torn-checkpoint-N, so that rotation never counts it and resume never
    picks it; put back a final_model/ a crash left moved aside (replace_folder)."""
    for folder in sorted(Path(output_dir).glob("checkpoint-*")):
        fault = checkpoint_fault(folder)
        if fault:
            aside = folder.with_name(f"{TORN}{folder.name}")
            if aside.exists():
                aside = folder.with_name(f"{TORN}{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(folder, aside)
            print(f"set aside {folder} as {aside.name}: {fault}")
    for name in REPLACED_FOLDERS:
        kept, aside = Path(output_dir) / name, Path(output_dir) / f"{name}.previous"
        if aside.exists() and not kept.exists():
            os.replace(aside, kept)


def replace_folder(new, dest):
    """Rename new to dest. A dest already there is moved aside (dest.previous) until new is in place, so a crash
    or a full disk between the two renames leaves a whole folder, which set_aside_torn puts back."""
    new, dest = Path(new), Path(dest)
    aside = dest.with_name(f"{dest.name}.previous")
    shutil.rmtree(aside, ignore_errors=True)
    if dest.exists():
        os.replace(dest, aside)
    os.replace(new, dest)
    shutil.rmtree(aside, ignore_errors=True)


def storage_error(err):
    """'ErrorType ERRNO' when err (or what caused it) is a full disk or quota in one of its three shapes, else
    None."""
    while err is not None:
        number = getattr(err, "errno", None) if isinstance(err, OSError) else None
        said = re.search(r"os error (\d+)", str(err))  # SafetensorError carries the errno in its text only
        number = number if number in STORAGE_ERRNOS else int(said.group(1)) if said else None
        if number in STORAGE_ERRNOS:
            return f"{type(err).__name__} {STORAGE_ERRNOS[number]}"
        if isinstance(err, RuntimeError) and re.search(r"unexpected pos|file write failed", str(err)):
            return f"{type(err).__name__} from torch.save (a failed write)"
        err = err.__cause__ or err.__context__
    return None


def human_bytes(count):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


class RunLock:
    """One run per output folder. Rank 0 holds an flock on <output_dir>/run.lock for the run's life; the kernel
    drops it when the holder dies, however it dies (kill -9 too), so a dead holder never blocks. The file's JSON
    names the holder for the refusal. A requeued run of the same SLURM job takes the lock over, since on a
    network filesystem the lock of a dead node can outlive it until its lease ends. The file is never deleted:
    a run that unlinked it would let the next two runs lock two different files."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self.fd = None

    def holder(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            job = os.environ.get("SLURM_JOB_ID")
            same_process = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
            if not (same_process or (job and holder.get("slurm_job") == job)):  # same process: an in-process rerun
                os.close(fd)
                raise UsageError(f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                                 f"{holder.get('pid')}, SLURM job {holder.get('slurm_job')}, started "
                                 f"{holder.get('started')}); wait for it or stop it, or pick another --output_dir")
        except OSError as err:  # a filesystem without locks (some Lustre mounts): run, and say it is unguarded
            print(f"warning: cannot lock {self.path} ({err.strerror}); nothing stops a second run into this folder")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "slurm_job": os.environ.get("SLURM_JOB_ID"),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None


class RunGuard:
    """Made by every rank at the start of main(): rank 0 locks the folder and sets torn checkpoints aside; every
    rank turns SIGTERM and SIGUSR1 into a flag that the ranks agree on at the next step boundary."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.main = is_main_process()
        self.lock = RunLock(self.output_dir)
        self.received = 0  # the stop signal this process got
        self.stop = None   # the signal every rank agreed to stop on
        if self.main:
            self.lock.acquire()
            set_aside_torn(self.output_dir)
            status = self.output_dir / STATUS
            if status.exists():  # a status describes the last stop; this run gets its own or none
                print(f"the previous run in {self.output_dir} stopped: {' '.join(status.read_text().split())}")
                status.unlink()
        self.previous_handlers = {number: signal.signal(number, self.on_signal) for number in STOP_SIGNALS}

    def on_signal(self, number, frame):
        # Only a flag: a save in progress finishes, and the ranks decide together at the next step boundary
        self.received = self.received or number

    def agreed(self, device):
        """True once any rank got a stop signal: a max all-reduce of the signal number, so every rank also
        exits with the same status."""
        if self.stop is None:
            import torch
            import torch.distributed as dist

            flag = torch.tensor(self.received, device=device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stop = int(flag.item()) or None
        return self.stop is not None

    def callback(self, trainer):
        """The Trainer callback: agree on a stop at each step end and at each evaluation batch, give saved
        adapters the umask's mode, and end the run once the stop's checkpoint is complete."""
        from transformers import TrainerCallback

        guard = self

        class GuardCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if guard.agreed(args.device):
                    # An evaluation due at this step still runs first: skipping it would change the RNG state the
                    # checkpoint saves (a dataloader draws a seed) and the best-checkpoint choice, so the resumed
                    # run would not end where an uninterrupted one ends. --signal's lead time must cover it.
                    control.should_save, control.should_training_stop = True, True

            def on_prediction_step(self, args, state, control, **kwargs):
                if guard.stop is None and guard.agreed(args.device):  # a signal that came during the evaluation
                    raise EvaluationAbandoned()

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    match_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                if guard.stop:
                    guard.stop_after_checkpoint(trainer)

        return GuardCallback()

    def stop_after_checkpoint(self, trainer):
        trainer.accelerator.wait_for_everyone()  # rank 0 has written the whole checkpoint, trainer_state.json last
        step = trainer.state.global_step
        if self.main:
            job = os.environ.get("SLURM_JOB_ID")
            # the checkpoint is complete, so the job may be requeued (SLURM then ends this run, which is ending)
            requeued = bool(job) and requeue(job)
            self.write_status(stopped_by=signal.Signals(self.stop).name, step=step,
                              checkpoint=str(self.output_dir / f"checkpoint-{step}"), requeued_slurm_job=requeued)
        trainer.accelerator.wait_for_everyone()  # no rank exits (and makes the launcher kill the rest) before that
        raise Stopped()

    def write_status(self, **fields):
        common.write_json_atomic(self.output_dir / STATUS, {**fields, "host": socket.gethostname(),
                                                            "time": time.strftime("%Y-%m-%d %H:%M:%S %z")})

    @contextlib.contextmanager
    def watch(self, trainer):
        """Turn a stop signal, a full disk and a non-finite gradient inside the block into their exit statuses."""
        try:
            yield
        except Stopped:
            name = signal.Signals(self.stop).name
            self.exit(trainer, 128 + self.stop, f"stopped by {name} at step {trainer.state.global_step}: "
                      f"{self.output_dir}/checkpoint-{trainer.state.global_step} is complete; no final_model/ "
                      f"written; rerun with --resume_from_checkpoint auto (see {STATUS})", to=sys.stdout)
        except NonFinite as err:
            if self.main:
                self.write_status(stopped_by="non-finite gradient norm", step=err.args[0])
            self.exit(trainer, EXIT_NON_FINITE, f"error: non-finite gradient norm ({err.args[1]}) at step "
                      f"{err.args[0]}, before its optimizer step, so no checkpoint holds it; lower --learning_rate "
                      f"or check the data, then rerun with --resume_from_checkpoint auto: it "
                      f"{resume_hint(self.output_dir)}")
        except Exception as err:
            error = storage_error(err)
            if error is None:
                raise
            torn = self.remove_torn(trainer.state.global_step) if self.main else []
            free = human_bytes(shutil.disk_usage(self.output_dir).free)
            removed = f"removed the torn {', '.join(torn)}; " if torn else ""
            self.exit(trainer, EXIT_DISK_FULL, f"error: could not write in {self.output_dir}: {error} ({free} "
                      f"free); {removed}make room, then rerun with --resume_from_checkpoint auto: it "
                      f"{resume_hint(self.output_dir)}", end_training=False)

    def remove_torn(self, step):
        """Remove what the failed save left: this step's checkpoint if it is not complete, and any folder still
        being assembled (final_model.incomplete)."""
        torn = [p for p in self.output_dir.glob("*.incomplete")]
        checkpoint = self.output_dir / f"checkpoint-{step}"
        if checkpoint.exists() and checkpoint_fault(checkpoint):
            torn.append(checkpoint)
        for folder in torn:
            shutil.rmtree(folder, ignore_errors=True)
        return [folder.name for folder in torn]

    def exit(self, trainer, status, line, to=None, end_training=True):
        if self.main:
            print(line, file=to or sys.stderr, flush=True)
        if end_training:  # every rank is here together (not so after a full disk, which rank 0 alone meets)
            trainer.accelerator.end_training()
        self.release()
        raise SystemExit(status)

    def release(self):
        """Restore the signal handlers and drop the lock: the run is over."""
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)
        self.lock.release()


def check_finite(grad_norm, step):
    """grad_norm, or NonFinite before the optimizer steps on it."""
    import math

    value = float(grad_norm)
    if not math.isfinite(value):
        raise NonFinite(step, value)
    return grad_norm


def requeue(job):
    """`scontrol requeue JOB`; False, with a warning, when it fails (the checkpoint is complete either way)."""
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"warning: could not requeue SLURM job {job} ({err}); resubmit the job to continue", file=sys.stderr)
        return False
    return True
