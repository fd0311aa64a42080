"""Mutation check: do the fast tests notice when an invariant the results rest on is broken?

    .venv/bin/python bench/mutation_check.py                     # every fast mutation (several minutes)
    .venv/bin/python bench/mutation_check.py --only vote-least-common wilson-z-1
    .venv/bin/python bench/mutation_check.py --slow              # also those only a slow test can catch
    .venv/bin/python bench/mutation_check.py --list              # the mutations and the tests each runs

Each mutation is a one-line change to a script (a `max` made `min`, a mask dropped, a z made 1.0) and names
the fast tests that must catch it. For each, the repository's files (tracked, plus new ones git does not
ignore) are copied to a temporary folder with demo_assets/ linked in, not copied (large, and only read), the
one change is applied, and its tests run there with pytest -x: a failing run means the mutation was killed;
a passing one means it SURVIVED, and the invariant is unguarded. Exit status 1 when any survived or could not
be checked (an original line no longer found exactly once: a stale mutation). Not part of make test; run the
fast tier first, since a test that fails without any mutation kills every mutation it is asked about.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900  # the slowest fast selection trains a tiny adapter first; a hung run must not stall the rest


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str  # must occur exactly once in file, or the mutation is stale
    replacement: str
    tests: tuple  # pytest arguments: node ids, or a file and -k
    slow: bool = False  # its only killer is a slow test: run with --slow or --only


TRAIN, PRE, INF = "train_sft_example.py", "preprocess_pmc_vqa_for_sft.py", "inference_example.py"
CONTRACTS, R1 = "tests/test_contracts.py::", "tests/test_format.py::test_demo_r1_tokenizer"
MUTATIONS = [
    # Splits, resume and the format
    Mutation("resume-oldest-checkpoint", TRAIN, "str(max(complete,", "str(min(complete,",
             ("tests/test_training.py::test_resume_picks_the_newest_complete_checkpoint_or_the_one_named",)),
    Mutation("completion-letter-always", "common.py", 'answer = f"{letter}. {text}" if self.include_choices else text',
             'answer = f"{letter}. {text}"', (CONTRACTS + "test_every_prompt_style_as_exact_strings",)),
    Mutation("validation-one-figure", PRE, "count = max(1, round(len(figures) * val_ratio))", "count = 1",
             (CONTRACTS + "test_validation_holds_out_val_ratio_of_the_figures_never_splitting_one",)),
    Mutation("test-files-swapped", PRE, '{"test_clean": "test_clean.csv", "test": "test.csv"}',
             '{"test_clean": "test.csv", "test": "test_clean.csv"}',
             (CONTRACTS + "test_the_test_file_flag_picks_the_file_it_names",)),
    # Tokenization: what is trained, and the ids inference feeds
    Mutation("prompt-trained", PRE, "labels = [[-100] * len(p) + c + [eos]", "labels = [p + c + [eos]", (R1,)),
    Mutation("no-eos-in-row", PRE, "input_ids = [p + c + [eos]", "input_ids = [p + c", (R1,)),
    Mutation("completion-gets-bos", PRE, "tokenizer(completions, add_special_tokens=False)",
             "tokenizer(completions, add_special_tokens=True)", (R1,)),
    Mutation("prompt-gets-bos", "model_kinds.py", "self.tokenizer(prompts, add_special_tokens=False)",
             "self.tokenizer(prompts, add_special_tokens=True)", (R1,)),
    Mutation("padding-trained", "model_kinds.py", "label_pad_token_id=-100",
             "label_pad_token_id=self.tokenizer.pad_token_id",
             ("tests/test_training.py::test_packed_loss_equals_padded_loss_on_the_same_rows",)),
    Mutation("dirty-rows-not-counted", PRE, "dropped.get(why, 0) + int(count)", "dropped.get(why, 0)",
             ("tests/test_preprocess.py::test_each_dirty_row_kind_is_dropped_and_counted",)),
    Mutation("token-drops-not-counted", PRE, "dropped.get(why, 0) + int((reasons == why).sum())",
             "dropped.get(why, 0)", ("tests/test_preprocess.py::test_over_long_rows_are_dropped_never_cut",)),
    Mutation("self-check-bos-inverted", "test_preprocessing.py", "ids.count(bos) != prompt_ids.count(bos)",
             "ids.count(bos) == prompt_ids.count(bos)",
             (CONTRACTS + "test_the_self_check_names_each_broken_invariant",)),
    # Inference: batching, scoring, reading the answer
    Mutation("score-right-padding", INF, 'inputs = prompter.batch(features, side="left"',
             'inputs = prompter.batch(features, side="right"',
             ("tests/test_inference.py::test_scores_do_not_depend_on_the_batch",)),
    Mutation("generate-right-padding", INF, 'for q in batch], side="left"', 'for q in batch], side="right"',
             ("tests/test_inference.py::test_batched_generation_equals_one_by_one_under_greedy",)),
    Mutation("score-without-eos", "model_kinds.py", '["input_ids"] + [self.tokenizer.eos_token_id]', '["input_ids"]',
             (R1,)),  # the scorer's continuation must be the ids training taught, eos included
    Mutation("parser-option-text-not-first", "common.py",
             "named = _option_named(last_line, options) if re.match(_ANSWER_HEAD, last_line, re.I) else None",
             "named = None",
             ("tests/test_inference.py::test_an_option_text_that_starts_like_a_letter_is_read_as_text",)),
    Mutation("parser-answer-is-first", "common.py", "(_FINAL_LINE, _BOXED, _ANSWER_IS)",
             "(_ANSWER_IS, _BOXED, _FINAL_LINE)", ("tests/test_inference.py", "-k", "parser or option_text")),
    Mutation("vote-least-common", INF, "most_common(1)[0][0]", "most_common()[-1][0]",
             (CONTRACTS + "test_majority_vote_takes_the_most_voted_letter_and_the_first_seen_on_a_tie",)),
    # The report's statistics
    Mutation("bootstrap-50-percent", INF, "np.percentile(means, [2.5, 97.5])", "np.percentile(means, [25, 75])",
             (CONTRACTS + "test_the_bootstrap_interval_is_a_95_percent_one",)),
    Mutation("wilson-z-1", INF, "z=1.959964", "z=1.0", (CONTRACTS + "test_the_wilson_interval_is_a_95_percent_one",)),
    Mutation("mcnemar-one-sided", INF, "min(1.0, 2 * tail)", "min(1.0, tail)",
             ("tests/test_inference.py::test_paired_comparison_matches_a_hand_computed_case",)),
    Mutation("collapse-ignores-gold", INF, " and gold_share < COLLAPSE_SHARE", "",
             (CONTRACTS + "test_collapse_warning_boundaries",)),
    Mutation("collapse-share-0.4", INF, "COLLAPSE_SHARE = 0.8", "COLLAPSE_SHARE = 0.4",
             (CONTRACTS + "test_collapse_warning_boundaries",)),
    # LoRA, checkpoints and a VLM's figure
    Mutation("vision-tower-gets-lora", "model_kinds.py", "return VISION_MODULES if vlm else None", "return None",
             ("tests/test_vlm.py::test_lora_and_4bit_touch_the_language_model_only[llava]",)),
    Mutation("blank-image-is-real", "model_kinds.py",
             'return Image.new("RGB", image.size, BLANK) if self.image_control == "blank" else image', "return image",
             ("tests/test_vlm.py::test_a_blank_figure_changes_what_the_model_sees[llava]",)),
    Mutation("check-adapter-silent", TRAIN, 'raise SystemExit(f"error: {path} is missing',
             'return SystemExit(f"error: {path} is missing',
             ("tests/test_training.py::test_an_adapter_less_folder_is_never_kept",)),
    Mutation("sampling-unseeded", INF, "    torch.manual_seed(args.seed)", "    pass",
             ("tests/test_traces.py::test_traces_resume_without_duplicates_after_a_kill",), slow=True),
    Mutation("process-group-left-to-exit", TRAIN, "    trainer.accelerator.end_training()", "    pass",
             ("tests/test_distributed.py::test_two_process_ddp_on_cpu_shards_data_and_syncs_gradients",), slow=True),
    Mutation("fsdp-save-model-off", TRAIN, "if not self.is_fsdp_enabled:", "if True:",
             ("tests/test_distributed.py::test_fsdp2_on_two_cpu_processes_trains_like_ddp_saves_a_full_adapter_and_"
              "resumes[SHARDED_STATE_DICT]",), slow=True),
    # The evaluation page (the browser tier kills the first two; it needs chromium)
    Mutation("page-wrong-only-inverted", "templates/evaluation_report.html.j2", "return q.p[k] !== q.g;",
             "return q.p[k] === q.g;", ("tests/test_report_page.py::test_filters_count_the_rows_they_show",)),
    Mutation("page-escaping-off", "evaluation_page.py", "autoescape=True", "autoescape=False",
             ("tests/test_report_page.py::test_data_is_text_never_markup",)),
    Mutation("ece-bins-off-by-one", "evaluation_page.py", "table[min(int(confidence * bins), bins - 1)]",
             "table[min(int(confidence * (bins - 1)), bins - 1)]",
             ("tests/test_report_page.py::test_ece_matches_a_hand_computed_case",)),
]


def stale(mutation):
    """Why the mutation cannot be applied to the file as it is now, or '' when it can."""
    count = (ROOT / mutation.file).read_text().count(mutation.original)
    return "" if count == 1 else f"stale mutation: original found {count} times in {mutation.file}"


def copy_repository(dest):
    """The files a commit would hold (tracked, and new ones git does not ignore: a new test file counts)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).exists():  # a tracked file deleted in the working tree is not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name, follow_symlinks=False)
    (dest / "demo_assets").symlink_to(ROOT / "demo_assets")


def first_failure(output):
    """The first test id in pytest's short summary (a line 'FAILED <node id> - <message>')."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return ""


def run(mutation):
    """(outcome, detail): killed, SURVIVED, or an error (stale, timeout, a test selection that runs nothing)."""
    if why := stale(mutation):
        return "STALE", why
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(copy)
        target = copy / mutation.file
        target.write_text(target.read_text().replace(mutation.original, mutation.replacement))
        # --basetemp in this temporary folder: pytest prunes old runs in the shared default one, which another
        # person's tests may be using. A new session, so a timeout also stops the scripts the tests launched.
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--basetemp={tmp}/pytest",
                   *mutation.tests]
        proc = subprocess.Popen(command, cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output = proc.communicate(timeout=TIMEOUT_S)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "TIMEOUT", f"no verdict within {TIMEOUT_S} s"
    if proc.returncode in (4, 5):  # usage error or nothing collected: a wrong test id would pass for a kill
        return "ERROR", f"pytest exit {proc.returncode}: the test selection runs no test"
    return ("killed", first_failure(output)) if proc.returncode else ("SURVIVED", "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations (slow ones included)")
    parser.add_argument("--slow", action="store_true", help="also run the mutations only a slow test catches")
    parser.add_argument("--list", action="store_true", help="print the mutations and the tests each runs")
    args = parser.parse_args()
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation {', '.join(sorted(unknown))}; --list shows them")
    chosen = [m for m in MUTATIONS if (m.name in args.only if args.only else args.slow or not m.slow)]
    if args.list:
        for m in chosen if args.only else MUTATIONS:
            why = stale(m)
            print(f"{m.name}{' (slow)' if m.slow else ''}: {m.file}: {m.original!r} -> {m.replacement!r}")
            print(f"    tests: {' '.join(m.tests)}{'  ' + why if why else ''}")
        return 0
    outcomes, start = [], time.time()
    for m in chosen:
        began = time.time()
        outcome, detail = run(m)
        outcomes.append(outcome)
        print(f"{m.name:<30} {outcome:<8} {time.time() - began:6.1f} s  {detail}", flush=True)
    killed, survived = outcomes.count("killed"), outcomes.count("SURVIVED")
    print(f"{killed} killed, {survived} survived, {len(outcomes) - killed - survived} not checked (stale, timeout, "
          f"no test run) of {len(outcomes)} mutations in {(time.time() - start) / 60:.1f} min")
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
