"""What the four scripts share: default paths, the prompt/answer format, the answer parser, small helpers.

Edit the four path constants below for your server (or set the environment variables named beside them;
every script's flags override both). Everything else here is the contract between preprocessing, training
and inference: change the format in one place and all three follow.
"""
import argparse
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

# --- Paths a user edits (env var > constant; each script's flag overrides both) ---------------------------
# The base model: a hub id or a local folder holding config.json, weights and the tokenizer.
MODEL_PATH = os.environ.get("PMCVQA_MODEL", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
# The PMC-VQA download: train.csv, test_clean.csv, test.csv (v1) or train_2.csv, test_2.csv (v2).
PMC_VQA_DIR = os.environ.get("PMCVQA_DATA", "PMC-VQA")
# Where preprocess_pmc_vqa_for_sft.py writes the tokenized dataset (training and inference read it).
PROCESSED_DIR = os.environ.get("PMCVQA_PROCESSED", "PMC-VQA-Processed")
# Where train_sft_example.py writes checkpoints, final_model/ and its reports.
OUTPUT_DIR = os.environ.get("PMCVQA_OUTPUT", "PMC-VQA-SFT-Output")

LETTERS = "ABCD"
ANSWER_PREFIX = "Answer:"
# A processed row as a question: what evaluation and accuracy scoring read (the figure for a VLM)
QUESTION_COLUMNS = ("id", "question", "options", "answer_label", "figure_path")
ATTENTION = ["auto", "flash_attention_2", "sdpa", "eager"]


class UsageError(Exception):
    """Bad input a user can fix: main() prints its message on one line and exits with status 2."""


class Unfinished(Exception):
    """A run that did what it could and left some items undone (a server that kept failing some questions):
    one line saying what to rerun, exit status 1."""


def make_parser(description):
    """An argparse parser for one of the scripts: the module docstring as help, and '@file' arguments.

    '@configs/demo/train.args' reads flags from a recipe file: any number per line, '#' starts a comment.
    """
    parser = argparse.ArgumentParser(description=description, fromfile_prefix_chars="@",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.convert_arg_line_to_args = lambda line: line.split("#", 1)[0].split()
    return parser


def quiet_console():
    """Keep what a user cannot act on out of the console: progress bars in a log file, and two library lines
    printed on every model load. bitsandbytes 0.50 warns that it could not fetch an optional bf16 CPU kernel
    from the Hub (never reachable offline, and unused by the fp32 CPU path); transformers warns that peft calls
    its deprecated is_gradient_checkpointing. Neither is this kit's call."""
    if not sys.stderr.isatty():
        for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(variable, "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class Switch(argparse.Action):
    """A setting with both forms, --name and --no_name: the last one given wins, so a flag written after a
    recipe file (@configs/...) can turn off what the recipe turned on."""

    def __init__(self, option_strings, dest, default=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))


def add_switch(parser, name, default, help):
    parser.add_argument(f"--{name}", f"--no_{name}", dest=name, action=Switch, default=default,
                        help=f"{help} (default: {'on' if default else 'off'})")


def add_attn_implementation(parser):
    parser.add_argument("--attn_implementation", choices=ATTENTION, default="auto",
                        help="attention kernel: auto = flash_attention_2 where the flash-attn package is installed "
                             "and a CUDA GPU is present (then --packing runs variable-length attention), else "
                             "sdpa (default: %(default)s)")


def attn_implementation(choice):
    """The attn_implementation to load a model with, or a one-line error for flash-attention without it."""
    import importlib.util

    import torch

    installed = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if choice == "flash_attention_2" and not installed:
        raise UsageError("--attn_implementation flash_attention_2 needs a CUDA GPU and pip install flash-attn "
                         "--no-build-isolation; or use sdpa")
    if choice != "auto":
        return choice
    return "flash_attention_2" if installed else "sdpa"


def run_main(main):
    """Run a script's main(); turn UsageError into one line on stderr and exit status 2 (no traceback), and
    Unfinished into one line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_console()
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Unfinished as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# --- The prompt and answer format (PMC_VQA_PREPROCESSING_README.md, "The format") -------------------------
def format_multiple_choice(options):
    """Options as the model sees them, one per line: 'A: text'."""
    return "\n".join(f"{letter}: {text}" for letter, text in zip(LETTERS, options))


def build_rationale(option_text):
    # PMC-VQA has no reasoning traces; this one sentence is what the gold label implies. It keeps the model
    # in R1's habit of thinking before answering, and it names the answer before the letter is needed.
    return f"The findings point to {option_text}."


@dataclass(frozen=True)
class PromptFormat:
    """How a question is asked and how its answer is written: the one contract of all four scripts.

    include_choices: the options A-D are shown and the answer line is 'Answer: B. text' (else 'Answer: text').
    add_reasoning: the prompt asks to think first and the completion opens with a rationale.
    thinks: the template's generation prompt opens a <think> block, so the completion must close it;
      set by model_kinds.Prompter from the rendered template, never by hand.
    """
    include_choices: bool = True
    add_reasoning: bool = False
    thinks: bool = True

    def user_turn(self, question, options):
        """The user turn. DeepSeek advises no system prompt, so every instruction lives here."""
        parts = [question.strip()]
        if self.include_choices:
            parts.append("Options:\n" + format_multiple_choice(options))
            final_line = f'"{ANSWER_PREFIX} <letter>. <option text>"'
        else:
            final_line = f'"{ANSWER_PREFIX} <answer>"'
        how = "Think briefly, then give" if self.add_reasoning else "Give"
        parts.append(f"{how} your final answer on the last line as {final_line}.")
        return "\n".join(parts)

    def answer_head(self, reasoning=""):
        """Everything the completion says before the answer itself: closing the think block, then 'Answer:'."""
        if self.thinks:
            return f"{reasoning}\n</think>\n\n{ANSWER_PREFIX}"
        return f"{reasoning}\n\n{ANSWER_PREFIX}" if reasoning else ANSWER_PREFIX

    def completion(self, letter, options, reasoning=None):
        """What the model learns to write after the prompt (eos is appended as a token, not as text).

        Appended as text, never rendered through the chat template: R1's template keeps only what follows
        the last '</think>' of an assistant turn and would silently delete the reasoning.
        """
        text = options[LETTERS.index(letter)]
        if reasoning is None:
            reasoning = build_rationale(text) if self.add_reasoning else ""
        answer = f"{letter}. {text}" if self.include_choices else text
        return f"{self.answer_head(reasoning)} {answer}"

    def answer_part(self, generated):
        """The text after the last '</think>'; None when a think block was opened and never closed
        (the model ran out of budget while reasoning: no answer, which is not the same as an unreadable one)."""
        if "</think>" in generated:
            return generated.rsplit("</think>", 1)[-1]
        return None if self.thinks else generated

    def split_reasoning(self, generated):
        """(reasoning, answer text) of a generated text: around the last '</think>', or, for a template without
        a think block, around the last 'Answer:' line. The reasoning is what a completion can be trained on."""
        if "</think>" in generated:
            reasoning, answer = generated.rsplit("</think>", 1)
        elif not self.thinks and ANSWER_PREFIX in generated:
            reasoning, answer = generated.rsplit(ANSWER_PREFIX, 1)
            answer = ANSWER_PREFIX + answer
        else:
            reasoning, answer = generated, ""
        return reasoning.strip(), answer.strip()

    def parse(self, generated, options):
        """The answer letter of a generated text, or None (see answer_part and parse_answer_letter)."""
        answer = self.answer_part(generated)
        return None if answer is None else parse_answer_letter(answer, options)

    def as_config(self):
        return asdict(self)


def read_processed_config(data_path):
    """The 'config' block of a processed folder's preprocessing_stats.json (the flags it was built with)."""
    stats = Path(data_path) / "preprocessing_stats.json"
    if not stats.exists() or not (Path(data_path) / "dataset_dict.json").exists():
        raise UsageError(f"{data_path} is not a complete processed dataset (an interrupted or missing run); run "
                         f"python preprocess_pmc_vqa_for_sft.py --output_dir {data_path}")
    return json.loads(stats.read_text())["config"]


# --- Reading the answer back (PMC_VQA_PREPROCESSING_README.md, "Reading the answer") --------------------
# A letter is "(b)" in any case, or a bare capital: a bare "a" is the article in "Answer: a small cyst".
_LETTER = r"(?:\(([A-Da-d])\)|((?-i:[A-D])))(?![\w'-])"
_ANSWER_HEAD = r"\s*\**answer\**\s*[:：]\s*\**\s*"  # "Answer:", "**Answer:**", "answer :"
_FINAL_LINE = re.compile(r"^" + _ANSWER_HEAD + _LETTER, re.I | re.M)
_BOXED = re.compile(r"\\boxed\{\s*\(?([A-Da-d])\)?\s*\}()")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*(?:option\s*)?" + _LETTER, re.I)
_LEADING_LETTER = re.compile(r"^\s*" + _LETTER + r"(?:[.:)]|\s*$)")  # not the article in "A lesion..."


def _normalise(text):
    return " ".join(text.replace("\u00a0", " ").split()).casefold().rstrip(".")


def _option_named(text, options):
    """The letter of the one option whose text is exactly `text` (case and spacing aside), else None."""
    said = _normalise(re.sub(r"^" + _ANSWER_HEAD, "", text.strip(), flags=re.I))
    matches = [letter for letter, option in zip(LETTERS, options) if _normalise(option) == said]
    return matches[0] if len(matches) == 1 else None


def parse_answer_letter(text, options):
    """The answer letter in a model's output, or None (a parse failure: counted, never guessed).

    Looks only after the last '</think>' when there is one, then tries, in order: the fixed final line
    'Answer: X' (or 'Answer: <option text>'), '\\boxed{X}', 'answer is X', a lone leading letter, the exact
    text of one option.
    """
    answer_part = text.rsplit("</think>", 1)[-1]
    last_line = answer_part.strip().rsplit("\n", 1)[-1]
    named = _option_named(last_line, options) if re.match(_ANSWER_HEAD, last_line, re.I) else None
    if named:
        return named  # "Answer: C. difficile colitis" names an option; it does not answer C
    for pattern in (_FINAL_LINE, _BOXED, _ANSWER_IS):
        found = pattern.findall(answer_part)
        if found:
            return "".join(found[-1]).upper()  # one of the two groups matched, the other is empty
    leading = _LEADING_LETTER.match(answer_part)
    if leading:
        return "".join(leading.groups(default="")).upper()
    return _option_named(answer_part, options)


# --- Small helpers ----------------------------------------------------------------------------------------
def make_output_folder(folder, flag):
    """Create the folder a script will write into, before any work: a path that cannot hold the output fails
    now in one line, never with a traceback after an evaluation or a training run that is then lost."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag}: cannot create the folder {folder} ({err.strerror or err}); pick a writable path")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag}: the folder {folder} is not writable; pick a writable path")


def write_text_atomic(path, text):
    """Written to a temporary name and renamed: a reader never sees half a file. The name is the writer's own
    (pid and a random part), so two writers never rename each other's half-written file; "x" keeps the umask's
    mode (mkstemp would give 0600). A failed write (a full disk) leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path, data):
    """Pretty-printed JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_precision(parser):
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="weights and compute: auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU; "
                             "bf16 also runs on a CPU, where CPUs with native bf16 (AVX-512 BF16, AMX) gain from it "
                             "(default: %(default)s)")


def pick_dtype(choice="auto"):
    """The torch dtype for --precision: the same choice for training and inference."""
    import torch

    if choice != "auto":
        return getattr(torch, PRECISIONS[choice])
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(load_in_4bit, load_in_8bit, compute_dtype, skip_modules=None):
    """bitsandbytes settings: QLoRA's nf4 with double quantization, or 8-bit; None for an unquantized base.
    skip_modules: kept in 16 bit (a VLM's vision tower and projector; None = bitsandbytes' default, the head)."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip_modules)
