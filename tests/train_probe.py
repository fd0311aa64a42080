"""Run train_sft_example.main() as a test needs it, recording what the run really did.

    python tests/train_probe.py OUT_DIR <train flags...>                                         # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/train_probe.py OUT_DIR <flags...>   # DDP on CPU

Environment (test-only knobs; the train script has none of them):
    PROBE_FSDP=configs/accelerate/fsdp.yaml   run as `accelerate launch --config_file` that file configures it, on CPU:
                                              stock accelerate never builds an FSDP state on a CPU (with use_cpu it
                                              silently builds MULTI_CPU, i.e. DDP), so the patch below promotes that
                                              state to FSDP when an FSDP plugin is given. It leans on accelerate's
                                              internals (pinned in requirements.txt); the report says whether the
                                              model really was wrapped by FSDP2, and the tests fail if it was not.
    PROBE_ACCURACY=0.5,0.9,0.6                the validation accuracies the run sees, in order (the scorer still
                                              runs; its result is replaced), so a test can decide which
                                              checkpoint is best
    PROBE_SIGNAL_AT=3:1                       SIGTERM during training step 3, to rank 1 only; 3:launcher sends it
                                              to torchrun, which passes it to every rank (a SLURM time limit)

Writes OUT_DIR/rank<R>.json: the rows each training step saw, the global step each training step began at, the
sum of every LoRA weight at the end, the wrapper type, whether it is an FSDP2 module, whether main() ended
training (the process group's teardown, run here after the weights are gathered), what transformers' loading
conditions were when the base model began to load, and which activation checkpointing ran (FSDP's or Trainer's).
"""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, launch_environment  # noqa: E402


def allow_fsdp_on_cpu():
    """accelerate.state.AcceleratorState.__init__ promotes only accelerator states (MULTI_GPU, ...) to FSDP:
    do the same for MULTI_CPU (gloo), as the GPU branch does."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = init


if os.environ.get("PROBE_FSDP"):
    for key, value in launch_environment(ROOT / os.environ["PROBE_FSDP"]).items():
        os.environ.setdefault(key, value)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"  # the config's bf16 is for GPUs; on CPU the script trains in fp32
    allow_fsdp_on_cpu()

import transformers  # noqa: E402

import inference_example  # noqa: E402
import train_sft_example  # noqa: E402

seen, steps = [], []
original_step = transformers.Trainer.training_step


signal_step, _, signal_target = os.environ.get("PROBE_SIGNAL_AT", "0:").partition(":")


def recording_step(self, model, inputs, *args, **kwargs):
    steps.append(self.state.global_step)
    sender = "0" if signal_target == "launcher" else signal_target  # one rank sends it, once
    if self.state.global_step == int(signal_step) - 1 and os.environ.get("RANK", "0") == sender:
        os.kill(os.getppid() if signal_target == "launcher" else os.getpid(), signal.SIGTERM)
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
        seen.append([t for t, m in zip(ids, mask) if m])
    return original_step(self, model, inputs, *args, **kwargs)


transformers.Trainer.training_step = recording_step
import model_kinds  # noqa: E402

loading, original_load = {}, model_kinds.load_model


def recording_load(*args, **kwargs):
    """What transformers' from_pretrained sees when it starts: its own conditions for FSDP's low-memory loading
    (a process group, ACCELERATE_USE_FSDP and FSDP_CPU_RAM_EFFICIENT_LOADING; then ranks other than local 0 skip
    materialising and initialising weights that rank 0 broadcasts)."""
    import torch.distributed
    from transformers.distributed.fsdp import is_fsdp_enabled
    from transformers.distributed.utils import is_local_dist_rank_0

    loading.update(process_group=torch.distributed.is_initialized(), fsdp_low_memory=is_fsdp_enabled(),
                   local_rank_0=is_local_dist_rank_0())
    return original_load(*args, **kwargs)


model_kinds.load_model = recording_load
# main() ends training (destroying the process group); the weights are gathered below, a collective: defer it
from accelerate import Accelerator  # noqa: E402

ended, end_training = [], Accelerator.end_training
Accelerator.end_training = lambda accelerator: ended.append(accelerator)
if os.environ.get("PROBE_ACCURACY"):
    scripted = [float(value) for value in os.environ["PROBE_ACCURACY"].split(",")]
    original_evaluate = inference_example.evaluate

    def scripted_evaluate(*args, **kwargs):
        return {**original_evaluate(*args, **kwargs), "accuracy": scripted.pop(0)}

    inference_example.evaluate = scripted_evaluate

out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
try:
    trainer = train_sft_example.main(argv)
except SystemExit:  # a fault ended the run (run_guard): tear the process group down as main() would have
    for accelerator in ended:
        end_training(accelerator)
    raise


def full(parameter):  # a sharded (DTensor) parameter, gathered: a collective, so every rank calls it
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


from torch.distributed.fsdp import FSDPModule  # noqa: E402

lora = {name: full(param).detach().double().sum().item() for name, param in trainer.model.named_parameters()
        if "lora_" in name}
rank = int(os.environ.get("RANK", 0))
(out_dir / f"rank{rank}.json").write_text(json.dumps({
    "seen": seen, "steps": steps, "lora": lora, "wrapped": type(trainer.model_wrapped).__name__,
    "fsdp2": isinstance(trainer.model_wrapped, FSDPModule),
    "distributed_type": trainer.accelerator.distributed_type.value,
    "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    "ended_training": len(ended), "loading": loading,
    # FSDP's activation checkpointing wraps layers in CheckpointWrapper; the Trainer's is a flag of the model
    "fsdp_checkpointed": sorted({type(module._checkpoint_wrapped_module).__name__ for module in
                                 trainer.model_wrapped.modules() if hasattr(module, "_checkpoint_wrapped_module")}),
    "trainer_checkpointing": trainer.args.activation_checkpointing}))
for accelerator in ended:
    end_training(accelerator)
