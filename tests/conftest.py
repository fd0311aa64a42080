"""Fixtures that build real small things: the demo assets, a processed dataset, a script runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import build_demo_assets  # noqa: E402


def run_script(script, *args, timeout=600, **kwargs):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), env=env, **kwargs)


@pytest.fixture(scope="session")
def assets():
    """(data_dir, model_dir) of the embedded default; built once (the Makefile builds it before the tests)."""
    return build_demo_assets.build_all(build_demo_assets.DEMO_DIR)


@pytest.fixture(scope="session")
def data_dir(assets):
    return assets[0]


@pytest.fixture(scope="session")
def model_dir(assets):
    return assets[1]


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def processed(tmp_path_factory, data_dir, model_dir):
    """The demo data preprocessed with default flags (the path to the DatasetDict folder)."""
    out = tmp_path_factory.mktemp("processed") / "data"
    import preprocess_pmc_vqa_for_sft as preprocess

    preprocess.main(["--data_path", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--num_proc", "1"])
    return out


@pytest.fixture(scope="session")
def small_processed(tmp_path_factory, data_dir, model_dir):
    """A small processed dataset (64 rows a split) for quick training runs."""
    out = tmp_path_factory.mktemp("small") / "data"
    import preprocess_pmc_vqa_for_sft as preprocess

    preprocess.main(["--data_path", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                     "--num_proc", "1", "--sample_size", "64"])
    return out
