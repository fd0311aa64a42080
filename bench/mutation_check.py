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
be checked (an original line no longer found exactly once: a stale mutation). First, a control run: the same
tests on an unmutated copy (which has no .git, like every mutant's) must pass, since a test that fails without
any mutation would kill every mutation it is asked about; exit status 2 when it does not. Not part of make test.
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
sys.path.insert(0, str(ROOT / "tests"))
from repository import repository_files  # noqa: E402  (one list of the repository's files, tests' too)
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
MAX_LENGTH = "tests/test_preprocess.py::test_max_length_keeps_a_row_of_exactly_that_length_and_drops_one_token_more"
SHARD = "return items[rank()::size()] if _joined else items"
PRECISION = CONTRACTS + "test_auto_precision_is_fp32_on_a_cpu_and_4_bit_is_qlora_nf4"
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
    Mutation("generate-right-padding", "generation.py", 'for q in batch], side="left"', 'for q in batch], side="right"',
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
    # Issue 33's seven: each shown to change a number or a letter a user reads, with no test failing
    Mutation("vote-counts-unparsed", INF, "votes = Counter(letter for letter in letters if letter)",
             "votes = Counter(letters)",
             (CONTRACTS + "test_majority_vote_takes_the_most_voted_letter_and_the_first_seen_on_a_tie",)),
    Mutation("blank-control-is-real-figure", INF, '{"": None, "blank_image/": "blank"}',
             '{"": None, "blank_image/": None}',
             ("tests/test_vlm.py::test_the_blank_figure_report_rows_score_blank_figures",)),
    Mutation("accuracy-on-train-rows", TRAIN, 'questions = splits["validation"].select(',
             'questions = splits["train"].select(',
             ("tests/test_training.py::test_checkpoint_accuracy_is_scored_on_validation_questions_only",)),
    Mutation("absolute-figure-path-kept", PRE, r'|^[\\/]|^[A-Za-z]:', r'|^[A-Za-z]:',
             (CONTRACTS + "test_figure_paths_that_could_leave_the_image_folder_are_dropped",)),
    Mutation("max-pixels-ignored", "model_kinds.py", '"longest_edge": max_pixels}',
             '"longest_edge": size["longest_edge"]}',
             ("tests/test_vlm.py::test_max_pixels_caps_the_image_tokens_of_a_pixel_budget_processor",)),
    Mutation("ids-without-split", PRE, '[f"{name}-{i}" for i in clean.index]', '[str(i) for i in clean.index]',
             ("tests/test_preprocess.py::test_row_ids_name_their_split_so_a_trace_never_reaches_another_split",)),
    Mutation("ambiguous-option-first", "common.py", "return matches[0] if len(matches) == 1 else None",
             "return matches[0] if matches else None",
             ("tests/test_inference.py::test_an_answer_naming_two_options_alike_is_unparsed_not_the_first",)),
    # The second audit's own: outputs, budgets, baselines, resume, splits, labels, controls, precision
    Mutation("eval-output-folder-not-made", INF,
             '        common.make_output_folder(Path(args.output_file).parent, "--output_file")', "        pass",
             ("tests/test_inference.py::test_evaluate_writes_the_documented_report",)),
    Mutation("preprocess-output-checked-late", PRE,
             '    common.make_output_folder(Path(args.output_dir).parent, "--output_dir")', "    pass",
             ("tests/test_bad_inputs.py", "-k", "preprocess and output_dir")),
    Mutation("train-output-checked-late", TRAIN, '    common.make_output_folder(args.output_dir, "--output_dir")',
             "    pass", ("tests/test_bad_inputs.py", "-k", "train and output_dir")),
    Mutation("generated-tokens-without-eos", "generation.py", "return ids.index(eos) + 1 if eos in ids",
             "return ids.index(eos) if eos in ids",
             (CONTRACTS + "test_generated_length_counts_the_eos_and_not_the_padding",)),
    Mutation("resume-keeps-partial-questions", INF, "if count >= k}", "if count >= 1}",
             (CONTRACTS + "test_resumed_traces_keep_only_questions_with_all_their_samples",)),
    Mutation("chance-always-four-options", INF, 'sum(1 / len(r["options"]) for r in records)',
             "sum(1 / len(LETTERS) for r in records)",
             (CONTRACTS + "test_the_chance_baseline_follows_each_questions_option_count",)),
    Mutation("split-flag-ignored", INF, "split = splits[args.split]", 'split = splits["test"]',
             ("tests/test_inference.py::test_the_split_asked_for_is_the_split_evaluated",)),
    Mutation("empty-option-kept", PRE, '(text == ""), "empty_choice")', '(text == "") & False, "empty_choice")',
             (CONTRACTS + "test_a_row_with_an_empty_option_is_dropped",)),
    Mutation("eos-not-in-length-budget", PRE, '"completion_length": [len(c) + 1 for c in completion_ids]',
             '"completion_length": [len(c) for c in completion_ids]',
             (MAX_LENGTH,)),
    Mutation("max-length-exclusive", PRE, '"completion_length") > args.max_length',
             '"completion_length") >= args.max_length',
             (MAX_LENGTH,)),
    Mutation("vlm-padding-trained", "model_kinds.py", '"labels": -100, "mm_token_type_ids": 0',
             '"labels": 0, "mm_token_type_ids": 0',
             ("tests/test_vlm.py::test_the_vlm_collator_pads_labels_that_are_never_trained",)),
    Mutation("self-check-blind-to-image-tokens", "test_preprocessing.py",
             "if image_token is not None and image_token in", "if image_token is None and image_token in",
             (CONTRACTS + "test_the_self_check_catches_a_trained_image_token",)),
    Mutation("cpu-auto-precision-bf16", "common.py", "        return torch.float32\n",
             "        return torch.bfloat16\n", (PRECISION,)),
    Mutation("qlora-fp4", "common.py", 'bnb_4bit_quant_type="nf4"', 'bnb_4bit_quant_type="fp4"', (PRECISION,)),
    Mutation("reported-metrics-of-last-evaluation", TRAIN, "step = state.best_global_step or max(evaluations",
             "step = max(evaluations",
             ("tests/test_training.py::test_the_best_checkpoint_becomes_final_model_and_early_stopping_stops",),
             slow=True),
    # The GPU path as it will run (issue 31)
    Mutation("torchvision-unpinned", "QUICKSTART_GUIDE.md", "pip install torchvision==0.28.0 --index-url",
             "pip install torchvision --index-url",
             ("tests/test_docs.py::test_the_torchvision_pin_shown_is_the_release_for_the_pinned_torch",)),
    Mutation("merge-under-deepspeed-allowed", TRAIN, "if requested_engine() and args.merge:",
             'if requested_engine() == "FSDP" and args.merge:',
             ("tests/test_distributed.py::test_merge_under_deepspeed_is_refused_before_anything_loads",)),
    Mutation("fsdp-wraps-absent-classes", TRAIN,
             "model._no_split_modules = [name for name in model._no_split_modules if name in present]",
             "model._no_split_modules = list(model._no_split_modules)",
             ("tests/test_distributed.py", "-k", "wraps_each_models_own_layers")),
    Mutation("fsdp-yaml-names-llama", "configs/accelerate/fsdp.yaml", "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
             "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer",
             ("tests/test_distributed.py", "-k", "wraps_each_models_own_layers")),
    Mutation("fsdp-activation-checkpointing-allowed", TRAIN,
             'if requested_engine() == "FSDP" and fsdp_checkpointing:', "if False:",
             ("tests/test_distributed.py::test_fsdps_own_activation_checkpointing_is_refused_with_one_line",)),
    Mutation("self-check-drops-max-pixels", "test_preprocessing.py",
             '["--max_pixels", str(args.max_pixels)] * bool(args.max_pixels)', "[]",
             ("tests/test_vlm.py::test_the_self_check_takes_the_vlm_preprocessing_recipe",)),
    Mutation("model-loads-before-process-group", TRAIN,
             "training_args = training_arguments(args, precision)\n"
             "    model = setup_model(args, dtype, prompter.reads_images)\n",
             "model = setup_model(args, dtype, prompter.reads_images)\n"
             "    training_args = training_arguments(args, precision)\n",
             ("tests/test_distributed.py::test_fsdp2_on_two_cpu_processes_trains_like_ddp_saves_a_full_adapter_and_"
              "resumes[SHARDED_STATE_DICT]",), slow=True),
    # Faults a cluster job meets (run_guard.py)
    Mutation("stop-signal-ignored", "run_guard.py", "self.received = self.received or number", "pass",
             ("tests/test_faults.py::test_a_stop_signal_saves_that_step_requeues_and_the_resumed_run_ends_on_the_"
              "same_adapter",)),
    Mutation("adapter-mode-0600", "run_guard.py", "os.chmod(path, 0o666 & ~mask)", "pass",
             ("tests/test_faults.py::test_a_stop_signal_saves_that_step_requeues_and_the_resumed_run_ends_on_the_"
              "same_adapter",)),
    Mutation("non-finite-grad-norm-steps", "run_guard.py", "if not math.isfinite(value):", "if False:",
             ("tests/test_faults.py::test_a_nan_loss_stops_before_the_optimizer_step_with_status_4",)),
    Mutation("torn-checkpoint-left", "run_guard.py", "if checkpoint.exists() and checkpoint_fault(checkpoint):",
             "if False:", ("tests/test_faults.py::test_a_full_disk_ends_in_one_line_with_status_3_and_loses_nothing_"
                           "complete[safetensors]",)),
    Mutation("non-finite-checkpoint-resumed", "run_guard.py",
             "if not all(torch.isfinite(tensor).all() for tensor in weights.values()):", "if False:",
             ("tests/test_faults.py::test_torn_checkpoints_are_set_aside_and_never_chosen_and_a_non_finite_one_is_"
              "refused",)),
    Mutation("folder-not-locked", "run_guard.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
             ("tests/test_faults.py::test_a_second_run_into_a_held_folder_exits_2_naming_the_holder",)),
    Mutation("shared-temporary-name", "common.py",
             'tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")',
             'tmp = path.with_name(path.name + ".tmp")',
             ("tests/test_faults.py::test_two_writers_of_one_file_never_collide",)),
    # Generation through a server (generation.py) and the evaluation journal (journal.py)
    Mutation("server-prompt-keeps-bos", "generation.py", "text = text.removeprefix(tokenizer.bos_token)", "pass",
             ("tests/test_server.py::test_greedy_through_the_server_equals_in_process_and_the_adapter_is_applied",)),
    Mutation("server-prompt-count-unchecked", "generation.py", "if response.usage.prompt_tokens != expected:",
             "if False:", ("tests/test_server.py::test_a_prompt_the_server_counts_differently_stops_the_run",)),
    Mutation("server-budget-unsent", "generation.py", '"max_tokens": args.max_new_tokens,', "",
             ("tests/test_server.py", "-k", "budget_below")),
    Mutation("journal-ignores-arguments", "journal.py", "if entries and entries[0] != head:", "if False:",
             ("tests/test_journal.py", "-k", "not slow and cut_line")),
    # Evaluation split across processes (data_parallel.py)
    Mutation("every-process-answers-everything", "data_parallel.py", SHARD, "return items",
             ("tests/test_inference.py::test_torchrun_splits_the_evaluation_and_writes_the_single_process_report",),
             slow=True),
    Mutation("training-ranks-split-validation", "data_parallel.py", SHARD, "return items[rank()::size()]",
             ("tests/test_inference.py::test_training_ranks_each_score_every_validation_question",)),
    Mutation("torchrun-any-mode", INF, "if data_parallel.size() > 1 and (args.server or not args.evaluate):",
             "if False:", ("tests/test_inference.py::test_torchrun_splits_evaluate_only_and_never_a_server",)),
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
    """The files a commit would hold (tracked, and new ones git does not ignore: a new test file counts); the
    copy has no .git, so the tests must pass without one (the control run proves it)."""
    for path in repository_files(ROOT):
        name = path.relative_to(ROOT)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / name, follow_symlinks=False)
    (dest / "demo_assets").symlink_to(ROOT / "demo_assets")


def first_failure(output):
    """The first test id in pytest's short summary (a line 'FAILED <node id> - <message>')."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return ""


def run_tests(tests, mutation=None):
    """(pytest's exit status, or None on a timeout; its output) for the tests run on a copy of the repository,
    with the mutation applied when one is given."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(copy)
        if mutation:
            target = copy / mutation.file
            target.write_text(target.read_text().replace(mutation.original, mutation.replacement))
        # --basetemp in this temporary folder: pytest prunes old runs in the shared default one, which another
        # person's tests may be using. A new session, so a timeout also stops the scripts the tests launched.
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--basetemp={tmp}/pytest",
                   *tests]
        proc = subprocess.Popen(command, cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output = proc.communicate(timeout=TIMEOUT_S)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, ""
    return proc.returncode, output


def run(mutation):
    """(outcome, detail): killed, SURVIVED, or an error (stale, timeout, a test selection that runs nothing)."""
    if why := stale(mutation):
        return "STALE", why
    status, output = run_tests(mutation.tests, mutation)
    if status is None:
        return "TIMEOUT", f"no verdict within {TIMEOUT_S} s"
    if status in (4, 5):  # usage error or nothing collected: a wrong test id would pass for a kill
        return "ERROR", f"pytest exit {status}: the test selection runs no test"
    return ("killed", first_failure(output)) if status else ("SURVIVED", "")


def control_run(chosen):
    """The chosen mutations' tests on an unmutated copy: '' when they pass, else what failed. A test that fails
    without a mutation would 'kill' every mutation it is asked about, so none is judged before this passes.
    Node ids run together in one pytest call; a selection with options (-k) runs on its own."""
    node_ids = sorted({test for m in chosen if not any(t.startswith("-") for t in m.tests) for test in m.tests})
    selections = ([node_ids] if node_ids else []) + [list(m.tests) for m in chosen
                                                      if any(t.startswith("-") for t in m.tests)]
    for tests in selections:
        status, output = run_tests(tests)
        if status != 0:
            return f"{' '.join(tests)[:200]}: " + (first_failure(output) or f"pytest exit {status}")
    return ""


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
    start = time.time()
    if failed := control_run(chosen):
        print(f"control run (no mutation) failed, so no mutation can be judged: {failed}")
        return 2
    print(f"control run (no mutation): the tests pass without .git, {time.time() - start:.0f} s", flush=True)
    outcomes = []
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
