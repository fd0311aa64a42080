"""Several processes, through the same script: DDP on 2 CPU processes (gloo), FSDP2 on 2 CPU processes with the
test-only switch in tests/train_probe.py (stock accelerate refuses FSDP on a CPU), the shipped accelerate configs,
and the combinations that are refused with one line."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, launch_environment, preprocess, run_in_process, run_probe, run_script

CONFIGS = ROOT / "configs" / "accelerate"
# one xdist worker runs this file, so its shared fixtures are built once (make test: -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("distributed")


def flags(data, model_dir, out, *extra):
    # 16 rows, 4 per process: 2 optimizer steps on 2 processes, a checkpoint after each
    return ["--data_path", data, "--model_name_or_path", model_dir, "--output_dir", out, "--max_samples", 16,
            "--batch_size", 4, "--grad_accum", 1, "--learning_rate", 3e-3, "--eval_steps", 1, "--logging_steps", 1,
            "--eval_accuracy_samples", 8, "--seed", 5, *extra]


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    import torch

    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].shape == b[name].shape and torch.allclose(a[name], b[name], atol=1e-5), name


def assert_ranks_split_the_data(ranks):
    seen = [{tuple(ids) for ids in rank["seen"]} for rank in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank trained on its own shard ...
    assert len(seen[0] | seen[1]) == 16                   # ... and together on every row


@pytest.fixture(scope="session")  # not module: xdist may interleave other files' tests, which would rebuild it
def ddp(tmp_path_factory, small_processed, model_dir):
    """(the 2-process DDP run's rank reports, its output folder): the reference for FSDP."""
    base = tmp_path_factory.mktemp("ddp")
    return run_probe(base / "probe", flags(small_processed, model_dir, base / "out"), processes=2), base / "out"


@pytest.mark.slow
def test_two_process_ddp_on_cpu_shards_data_and_syncs_gradients(ddp):
    ranks, out = ddp
    assert all(rank["wrapped"] == "DistributedDataParallel" and rank["distributed_type"] == "MULTI_CPU"
               for rank in ranks)
    assert_ranks_split_the_data(ranks)
    assert ranks[0]["lora"] == ranks[1]["lora"]  # gradients were averaged: identical weights
    assert all(rank["ended_training"] == 1 for rank in ranks)  # the process group is torn down, not left to exit
    assert adapter(out / "final_model")
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["metrics"]["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp2_on_two_cpu_processes_trains_like_ddp_saves_a_full_adapter_and_resumes(
        tmp_path, ddp, small_processed, model_dir, state_dict_type):
    env = {"PROBE_FSDP": "configs/accelerate/fsdp.yaml", "FSDP_STATE_DICT_TYPE": state_dict_type}
    out = tmp_path / "out"
    ranks = run_probe(tmp_path / "probe", flags(small_processed, model_dir, out), processes=2, env=env)
    assert all(rank["fsdp2"] and rank["distributed_type"] == "FSDP" for rank in ranks), "FSDP did not run"
    # the process group existed when the base began to load, so transformers took FSDP's low-memory route: ranks
    # other than 0 neither materialise nor initialise what rank 0's weights, broadcast by accelerate, replace
    assert [rank["loading"] for rank in ranks] == [
        {"process_group": True, "fsdp_low_memory": True, "local_rank_0": rank == 0} for rank in range(2)]
    assert_ranks_split_the_data(ranks)
    ddp_ranks, ddp_out = ddp
    assert ranks[0]["losses"] == pytest.approx(ddp_ranks[0]["losses"], abs=1e-4)
    assert_same_adapter(adapter(out / "final_model"), adapter(ddp_out / "final_model"))  # gathered, full shapes
    assert adapter(out / "checkpoint-1")  # every checkpoint holds an adapter too

    # a run killed after its first checkpoint leaves what this copy holds; it resumes at that step
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(out / "checkpoint-1", cut / "checkpoint-1")
    resumed = run_probe(tmp_path / "resumed", flags(small_processed, model_dir, cut, "--resume_from_checkpoint",
                                                    "auto"), processes=2, env=env)
    assert resumed[0]["steps"] == [1]
    assert_same_adapter(adapter(cut / "final_model"), adapter(out / "final_model"))


@pytest.fixture(scope="module")
def vlm_small_processed(tmp_path_factory, assets):
    """The image-only demo set preprocessed for the tiny LLaVA (SigLIP tower, Llama text model), 64 rows a split."""
    out = tmp_path_factory.mktemp("vlm") / "data"
    preprocess(assets.image_data, assets.vlm, out, "--sample_size", 64)
    return out


@pytest.mark.slow
def test_fsdp2_runs_a_vlm_with_the_shipped_config_and_gradient_checkpointing(tmp_path, vlm_small_processed, assets):
    """One fsdp.yaml for the text model and a VLM: accelerate wraps the model's own layer classes (both towers), and
    with --gradient_checkpointing (the Trainer's: FSDP's own is refused) a full adapter is saved and equals DDP's."""
    ddp_out, fsdp_out = tmp_path / "ddp", tmp_path / "fsdp"
    ddp_ranks = run_probe(tmp_path / "ddp_probe", flags(vlm_small_processed, assets.vlm, ddp_out,
                                                        "--gradient_checkpointing"), processes=2)
    ranks = run_probe(tmp_path / "fsdp_probe", flags(vlm_small_processed, assets.vlm, fsdp_out,
                                                     "--gradient_checkpointing"), processes=2,
                      env={"PROBE_FSDP": "configs/accelerate/fsdp.yaml"})
    assert all(rank["fsdp2"] and rank["distributed_type"] == "FSDP" for rank in ranks), "FSDP did not run"
    assert all(rank["trainer_checkpointing"] and not rank["fsdp_checkpointed"] for rank in ranks + ddp_ranks)
    assert ranks[0]["losses"] == pytest.approx(ddp_ranks[0]["losses"], abs=1e-4)
    assert_same_adapter(adapter(fsdp_out / "final_model"), adapter(ddp_out / "final_model"))


@pytest.mark.parametrize("model", ["model", "vlm", "qwen_vl"])
def test_the_fsdp_config_wraps_each_models_own_layers(model, assets, monkeypatch):
    """configs/accelerate/fsdp.yaml names no layer class: accelerate's policy takes the model's _no_split_modules,
    kept to the classes the model has (a SigLIP or CLIP tower lists its text tower's too, and accelerate stops at a
    missing one). A class named in the config would stop every model without it."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    import model_kinds
    import train_sft_example as train

    for key, value in launch_environment(CONFIGS / "fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    folder = getattr(assets, model)
    vlm = model_kinds.reads_images(folder, trust_remote_code=True)
    peft_model = train.setup_model(train.parse_args(["--model_name_or_path", str(folder), "--trust_remote_code"]),
                                   torch.float32, vlm)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), peft_model)
    wrapped = {type(module).__name__ for module in peft_model.modules() if policy(module)}
    expected = {"model": {"LlamaDecoderLayer"}, "qwen_vl": {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"},
                "vlm": {"LlamaDecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings",
                        "SiglipMultiheadAttentionPoolingHead"}}[model]
    assert wrapped == expected


def test_fsdps_own_activation_checkpointing_is_refused_with_one_line(tmp_path, monkeypatch):
    """accelerate's FSDP activation checkpointing wraps each layer in a CheckpointWrapper, which renames it; PEFT 0.21
    derives the adapter's keys from the module names and saves an empty adapter. Refused before anything loads; the
    line names the working setting (--gradient_checkpointing, the Trainer's)."""
    import train_sft_example

    for key, value in launch_environment(CONFIGS / "fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")  # fsdp_activation_checkpointing: true in the YAML
    result = run_in_process(train_sft_example.main, *flags(tmp_path / "none", tmp_path / "none", tmp_path / "o"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "fsdp_activation_checkpointing: true is not supported" in lines[0] and "--gradient_checkpointing" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["1", "launcher"], ids=["one-rank", "torchrun"])
def test_sigterm_on_two_processes_stops_every_rank_at_one_checkpoint_and_resumes_to_the_same_adapter(
        tmp_path, ddp, small_processed, model_dir, target):
    """SIGTERM during step 1, to rank 1 alone (no hang: the ranks agree at the step's end) or to torchrun, which
    passes it to both ranks as a SLURM time limit does."""
    out = tmp_path / "out"
    (tmp_path / "probe").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "tests" / "train_probe.py"), str(tmp_path / "probe"),
               *map(str, flags(small_processed, model_dir, out))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PROBE_SIGNAL_AT": f"1:{target}",
                                 "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"})
    assert "stopped by SIGTERM at step 1" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    if target == "1":  # torchrun reports each rank's status (with the signal to itself, it reports that signal)
        assert f"exitcode  : {128 + signal.SIGTERM}" in result.stderr
    status = json.loads((out / "run_status.json").read_text())
    assert (status["stopped_by"], status["step"]) == ("SIGTERM", 1)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"] and adapter(out / "checkpoint-1")
    assert not (out / "final_model").exists() and not (out / "eval_results.json").exists()
    if target == "1":
        resumed = run_probe(tmp_path / "resumed", flags(small_processed, model_dir, out, "--resume_from_checkpoint",
                                                        "auto"), processes=2)
        assert resumed[0]["steps"] == [1]
        assert_same_adapter(adapter(out / "final_model"), adapter(ddp[1] / "final_model"))


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_accelerate_config_builds_the_engine_it_claims(config):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    loaded = load_config_from_file(str(config))
    claimed = config.stem.split("_")[0].upper()  # ddp, fsdp, deepspeed_zero2, deepspeed_zero3
    assert loaded.num_processes >= 2 and loaded.distributed_type.value == {"DDP": "MULTI_GPU"}.get(claimed, claimed)
    if claimed == "FSDP":
        env = launch_environment(config)
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            plugin = FullyShardedDataParallelPlugin()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert env["ACCELERATE_USE_FSDP"] == "true" and plugin.fsdp_version == 2
        assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
    if claimed == "DEEPSPEED":
        plugin = DeepSpeedPlugin(**loaded.deepspeed_config)
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == int(config.stem[-1])


@pytest.mark.parametrize("extra, words", [
    (["--load_in_4bit"], ["FSDP does not shard 4-bit", "ddp.yaml"]),
    (["--merge"], ["--merge is not supported under FSDP", "merge on one process"]),
    ([], ["FSDP was asked for", "torchrun"]),  # one CPU process: accelerate would quietly not shard
])
def test_what_fsdp_cannot_do_is_refused_with_one_line(tmp_path, small_processed, model_dir, extra, words):
    result = run_script("train_sft_example.py", *flags(small_processed, model_dir, tmp_path / "o", *extra),
                        env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and all(word in lines[0] for word in words), result.stderr
    assert not (tmp_path / "o" / "final_model").exists()


def test_merge_under_deepspeed_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """PEFT does not support merging under DeepSpeed (under ZeRO-3 rank 0 would fold partitioned weights at the very
    end of the run): refused at once, with the advice given for FSDP. Nothing is read, so the paths may not exist."""
    import train_sft_example

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    result = run_in_process(train_sft_example.main, *flags(tmp_path / "none", tmp_path / "none", tmp_path / "o",
                                                           "--merge"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--merge is not supported under DEEPSPEED" in lines[0] and "merge on one process" in lines[0]
    assert not (tmp_path / "o").exists()
