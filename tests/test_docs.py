"""The four documents cannot drift from the code: every flag they pass a script exists, every file they
name exists, and every make target they show is defined. The repository
stands on its own: no file, document or code comment, names a repository file that it does not contain."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from repository import repository_files

DOCS = ["README.md", "QUICKSTART_GUIDE.md", "PMC_VQA_PREPROCESSING_README.md", "FILES_SUMMARY.md", "MULTI_GPU.md"]
SCRIPTS = {"preprocess_pmc_vqa_for_sft.py", "train_sft_example.py", "inference_example.py", "test_preprocessing.py",
           "build_demo_assets.py"}


def commands(text):
    """Every shell line of a document (continuations joined), from code blocks and inline code."""
    text = text.replace("\\\n", " ")
    return re.findall(r"`([^`\n]+)`", text) + text.splitlines()


def script_flags(text):
    for line in commands(text):
        for match in re.finditer(r"(?:^|[\s/])([a-z_]+\.py)((?:\s+(?:--[a-z_0-9]+|\"[^\"]*\"|'[^']*'|[^\s`|]+))*)",
                                 line):
            if match.group(1) in SCRIPTS:
                yield match.group(1), re.findall(r"(?:^|\s)(--[a-z_0-9]+)", match.group(2))


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_shown_is_accepted_by_its_script(doc):
    text = (ROOT / doc).read_text()
    shown = list(script_flags(text))
    assert shown or doc == "FILES_SUMMARY.md"
    for script, flags in shown:
        accepted = {option for action in __import__(script[:-3]).make_parser()._actions
                    for option in action.option_strings}
        for flag in flags:
            assert flag in accepted, f"{doc}: {script} has no flag {flag}"


def shown_command_lines(text):
    """(script, its argument list) for every command line of a document's code blocks, as a shell splits it."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text.replace("\\\n", " "), re.S)
    for line in (line for block in blocks for line in block.splitlines()):
        words = shlex.split(line, comments=True)
        if not words or not re.fullmatch(r"(.*/)?python3?|torchrun|accelerate", words[0]):
            continue  # a diagram, a table or a make line, not a command that runs a script
        for i, word in enumerate(words):
            if Path(word).name in SCRIPTS:
                end = next((j for j in range(i + 1, len(words)) if words[j] in {"|", "&&", ";", ">"}), len(words))
                yield Path(word).name, words[i + 1:end]
                break


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_shown_parses_with_its_script(doc, monkeypatch):
    """Each command as written, recipe files (@configs/...) read, through the script's own parser: a wrong
    choice, a missing value or a flag that moved fails here, not on a user's server."""
    monkeypatch.chdir(ROOT)  # recipe paths in the documents are relative to the repository root
    shown = list(shown_command_lines((ROOT / doc).read_text()))
    assert shown or doc in ("FILES_SUMMARY.md", "PMC_VQA_PREPROCESSING_README.md")
    for script, args in shown:
        parser = __import__(script[:-3]).make_parser()
        try:
            parser.parse_args(args)
        except SystemExit as exited:
            assert exited.code == 0, f"{doc}: {script} {' '.join(args)}"  # 0: a --help line


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_file_named_exists(doc):
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"`((?:bench|tests|configs|\.ci)/[\w./-]+|[\w-]+\.(?:py|md|txt|yaml))`", text))
    named |= set(re.findall(r"\]\(([\w./-]+\.md)\)", text))
    for name in named:
        assert (ROOT / name).exists(), f"{doc} names {name}, which does not exist"


def test_no_tracked_file_names_a_repository_file_it_lacks():
    files = repository_files(ROOT)
    basenames = {path.name for path in files}
    # a path with folders and any of these suffixes, or a bare file name (.args and .jinja only with folders:
    # `trainer.args` is code, a bare chat_template.jinja lives in model folders)
    pattern = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w-]+\.(?:py|md|txt|yaml|args|jinja|ini)|"
                         r"[\w-]+\.(?:py|md|txt|yaml|ini))(?![\w/])")
    for path in files:
        if path.suffix not in {".py", ".md", ".args", ".txt", ".ini"} and path.name != "Makefile":
            continue
        for name in pattern.findall(path.read_text()):
            exists = (ROOT / name).exists() or ("/" not in name and name in basenames)
            assert exists, f"{path.relative_to(ROOT)} names {name}, which this repository does not contain"


def test_make_targets_shown_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    for doc in DOCS:
        for target in re.findall(r"`make ([a-z-]+)`", (ROOT / doc).read_text()):
            assert target in targets, f"{doc}: make {target}"


# torchvision's compatibility table: each release requires exactly one torch version
TORCHVISION_FOR_TORCH = {"2.13.0": "0.28.0"}


def test_the_torchvision_pin_shown_is_the_release_for_the_pinned_torch():
    """An unpinned or mismatched `pip install torchvision` replaces the pinned torch on a user's GPU server."""
    torch = re.search(r"^torch==([\d.]+)\s*$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    for name in ("QUICKSTART_GUIDE.md", "model_kinds.py"):
        text = (ROOT / name).read_text()
        assert set(re.findall(r"torchvision==([\d.]+)", text)) == {TORCHVISION_FOR_TORCH[torch]}, name
        assert not re.search(r'pip install[\s"]*torchvision(?!==)', text), f"{name}: an unpinned install"


@pytest.mark.parametrize("script", sorted((ROOT / "configs" / "slurm").glob("*.sbatch")), ids=lambda path: path.name)
def test_the_slurm_example_is_valid_bash_and_its_training_line_parses(script, monkeypatch):
    """bash -n, the flags of its train_sft_example.py line through the script's parser, and the settings that
    make a time limit end in a checkpoint and a requeue rather than a kill."""
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    monkeypatch.chdir(ROOT)
    line = re.search(r"^srun torchrun(.*?)&$", text.replace("\\\n", " "), re.M | re.S).group(1)
    words = shlex.split(line)
    args = words[words.index("train_sft_example.py") + 1:]
    parsed = __import__("train_sft_example").make_parser().parse_args(args)
    assert parsed.resume_from_checkpoint == "auto"
    for setting in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                    "--shutdown-timeout", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=", "SRUN_CPUS_PER_TASK",
                    "trap forward USR1", "--machine_rank", "NCCL_SOCKET_IFNAME"):
        assert setting in text, setting
