"""PMC-VQA CSVs (v1 or v2) or a saved HF dataset -> a chat-formatted, tokenized DatasetDict for SFT.

    python preprocess_pmc_vqa_for_sft.py --data_path PMC-VQA --output_dir PMC-VQA-Processed
    python preprocess_pmc_vqa_for_sft.py --data_path demo_assets/PMC-VQA \\
        --model_name_or_path demo_assets/tiny-r1-llama --output_dir demo_outputs/processed

    python preprocess_pmc_vqa_for_sft.py --data_path demo_assets/PMC-VQA-images \
        --model_name_or_path demo_assets/tiny-llava --output_dir demo_outputs/vlm-processed   # a VLM: figures too

Writes <output_dir>/ (train / validation / test, unpadded: input_ids, attention_mask, labels, and readable
id, question, options, answer_label, figure_path, prompt, completion), examples.json and
preprocessing_stats.json. Rows whose gold letter is not certain are dropped and counted by reason; for a
vision-language model, so are rows whose figure cannot be used (pixels are not stored: the training
collator reads each figure from --image_root). The output appears only when complete: it is built under a
temporary name and renamed at the end.
"""
import os
import shutil
from pathlib import Path

import common
import model_kinds
from common import LETTERS, UsageError

V1_COLUMNS = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
V2_COLUMNS = ["Figure_path", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer"]
SPLIT_FILES = {"v1": ("train.csv", {"test_clean": "test_clean.csv", "test": "test.csv"}),
               "v2": ("train_2.csv", {"test_clean": "test_2.csv", "test": "test_2.csv"})}
IMAGE_FOLDERS = {"v1": "images", "v2": "figures"}  # where images.zip / images_2.zip unzip


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--data_path", default=common.PMC_VQA_DIR,
                        help="PMC-VQA folder, one CSV, or a saved HF dataset folder (default: %(default)s)")
    parser.add_argument("--data_version", choices=["auto", "v1", "v2"], default="auto",
                        help="which release in a folder holding both train.csv (v1) and train_2.csv (v2) "
                             "(default: %(default)s = v1 if present)")
    parser.add_argument("--test_file", default="test_clean",
                        help="v1 test set: test_clean (test_clean.csv, the paper's hand-checked 2k) or test "
                             "(test.csv, 50k); or the path of any test CSV (v2 uses test_2.csv) (default: %(default)s)")
    parser.add_argument("--image_root", default=None,
                        help="folder the Figure_path column is relative to; read only for a vision-language model "
                             "(default: <data folder>/images for v1, <data folder>/figures for v2)")
    parser.add_argument("--max_pixels", type=int, default=None,
                        help="cap on a figure's pixels for processors that resize to a pixel budget (Qwen-VL): "
                             "an image becomes about max_pixels / 784 tokens; 256-512 x 28 x 28 suits PMC "
                             "figures (default: the processor's own)")
    parser.add_argument("--model_name_or_path", default=common.MODEL_PATH,
                        help="model whose tokenizer and chat template to use (default: %(default)s)")
    parser.add_argument("--output_dir", default=common.PROCESSED_DIR, help="where to write (default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=2048,
                        help="longest prompt+completion in tokens; longer rows are dropped, never cut "
                             "(default: %(default)s)")
    common.add_switch(parser, "include_choices", True,
                      "show the options A-D in the prompt and answer 'Answer: B. text'; --no_include_choices: the "
                      "question only, and the completion states the option text without a letter")
    common.add_switch(parser, "add_reasoning", False,
                      "ask the model to think first; the completion opens with a one-line rationale")
    parser.add_argument("--reasoning_traces", default=None,
                        help="traces.jsonl from inference_example.py --generate_traces: a training row whose "
                             "question has a correct trace learns its shortest one as the reasoning (default: none)")
    parser.add_argument("--traces_fallback", choices=["empty", "drop"], default="empty",
                        help="training rows without a correct trace: keep the plain completion, or drop them "
                             "(counted as no_correct_trace) (default: %(default)s)")
    parser.add_argument("--sample_size", type=int, default=None,
                        help="keep at most this many rows per split after cleaning (default: all)")
    parser.add_argument("--val_ratio", type=float, default=0.05,
                        help="share of train figures held out as validation, grouped by Figure_path so no "
                             "image is in both; a single CSV gives the same share again to a test split, at "
                             "least one figure each (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the validation split (default: %(default)s)")
    parser.add_argument("--num_proc", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes for tokenization (default: %(default)s)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the tokenizer to run code from its folder (off: only if you trust it)")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.sample_size is not None and args.sample_size < 1:
        raise UsageError(f"--sample_size must be at least 1, got {args.sample_size}")
    if not 0 < args.val_ratio < 0.5:
        raise UsageError(f"--val_ratio must be in (0, 0.5), got {args.val_ratio}")
    if args.reasoning_traces and not Path(args.reasoning_traces).is_file():
        raise UsageError(f"--reasoning_traces {args.reasoning_traces} is not a file; make one with "
                         "python inference_example.py --generate_traces")
    if args.max_length < 16 or args.num_proc < 1:
        raise UsageError("--max_length must be at least 16 and --num_proc at least 1")
    if args.max_pixels is not None and args.max_pixels < 28 * 28:
        raise UsageError(f"--max_pixels must be at least 784 (one 28x28 patch), got {args.max_pixels}")
    if args.test_file not in ("test_clean", "test") and not Path(args.test_file).is_file():
        raise UsageError(f"--test_file {args.test_file} is neither test_clean, test nor a CSV file")
    common.make_output_folder(Path(args.output_dir).parent, "--output_dir")  # the dataset is renamed into it
    return args


# --- Reading: any source -> pandas frames in one canonical schema -------------------------------------------
def read_csv(path):
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8")
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty; re-download it from the PMC-VQA dataset")
    except pd.errors.ParserError as err:
        raise UsageError(f"{path} is not a valid CSV ({str(err).strip()}); re-download it")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def detect_schema(frame, source):
    """'v1' or 'v2', from the header alone (file names lie: people rename them)."""
    columns = set(frame.columns)
    if set(V1_COLUMNS) <= columns:
        return "v1"
    if set(V2_COLUMNS) <= columns:
        return "v2"
    raise UsageError(f"{source}: unknown schema; found columns {sorted(columns)}, expected v1 {V1_COLUMNS} "
                     f"or v2 {V2_COLUMNS}")


def load_sources(data_path, test_file, data_version):
    """({split_name: pandas frame}, default image root) from a PMC-VQA folder, one CSV, or a saved HF dataset."""
    path = Path(data_path)
    if not path.exists():
        raise UsageError(f"--data_path {data_path} does not exist; download PMC-VQA (QUICKSTART_GUIDE.md) or set "
                         "PMC_VQA_DIR in common.py")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UsageError(f"--data_path {data_path} is a file but not a .csv; pass a CSV or the PMC-VQA folder")
        sources = {"train": read_csv(path)}
        folder = path.parent
    elif (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        from datasets import load_from_disk

        loaded = load_from_disk(str(path))
        splits = loaded if hasattr(loaded, "keys") else {"train": loaded}
        sources, folder = {name: split.to_pandas().astype(str) for name, split in splits.items()}, path
    else:
        versions = [v for v, (train_name, _) in SPLIT_FILES.items() if (path / train_name).exists()
                    and data_version in ("auto", v)]
        if not versions:
            raise UsageError(f"{data_path} holds neither train.csv (v1) nor train_2.csv (v2) nor a saved dataset"
                             f"{'' if data_version == 'auto' else f' of --data_version {data_version}'}; point "
                             "--data_path at the unzipped PMC-VQA folder")
        if len(versions) > 1:
            print(f"{data_path} holds v1 and v2; using v1 (--data_version v2 for the other)")
        train_name, tests = SPLIT_FILES[versions[0]]
        sources, folder = {"train": read_csv(path / train_name)}, path
        test = path / tests.get(test_file, "")
        if test.is_file():
            sources["test"] = read_csv(test)
    if test_file not in ("test_clean", "test"):
        sources["test"] = read_csv(test_file)
    return sources, folder / IMAGE_FOLDERS[detect_schema(sources["train"], data_path)]


def strip_choice(cells, letter):
    """' A:Diffuse uptake ' -> ('A', 'Diffuse uptake'); NBSPs and stray spaces go."""
    cells = cells.str.replace("\u00a0", " ", regex=False).str.strip()
    parts = cells.str.extract(r"^([A-Da-d])\s*[:.)]\s*(.*)$")
    prefix = parts[0].str.upper().fillna(letter)      # no prefix at all: the column names the letter
    text = parts[1].fillna(cells).str.replace(r"\s+", " ", regex=True).str.strip()
    return prefix, text


def canonical_rows(frame, source):
    """The frame in one schema (question, options A-D, gold letter) plus a drop reason per row ('' = keep).

    Vectorised pandas string operations: the full 177k-row train.csv cleans in about a second.
    """
    import pandas as pd

    schema = detect_schema(frame, source)
    out = pd.DataFrame({"figure_path": frame["Figure_path"].str.strip(),
                        "question": frame["Question"].str.replace("\u00a0", " ", regex=False).str.strip()})
    reason = pd.Series("", index=frame.index)
    for letter in LETTERS:
        prefix, text = strip_choice(frame[f"Choice {letter}"], letter)
        out[letter] = text
        reason = reason.mask((reason == "") & (prefix != letter), "choice_prefix_differs_from_column")
        reason = reason.mask((reason == "") & (text == ""), "empty_choice")
    answer = frame["Answer"].str.replace("\u00a0", " ", regex=False).str.strip()
    if schema == "v1":
        label = frame["Answer_label"].str.strip().str.upper()
        reason = reason.mask((reason == "") & answer.str.upper().isin(["", "N/A", "NA", "NONE"]), "missing_answer")
        reason = reason.mask((reason == "") & ~label.isin(list(LETTERS)), "answer_label_not_a_to_d")
        norm = lambda s: s.str.replace(r"\s+", " ", regex=True).str.casefold().str.rstrip(".")
        answer_norm = norm(answer)
        matches = pd.concat({letter: norm(out[letter]) == answer_norm for letter in LETTERS}, axis=1)
        labelled = pd.concat([matches[letter] & (label == letter) for letter in LETTERS], axis=1).any(axis=1)
        reason = reason.mask((reason == "") & ~matches.any(axis=1), "answer_text_matches_no_option")
        reason = reason.mask((reason == "") & ~labelled, "answer_text_disagrees_with_label")
    else:
        label = answer.str.extract(r"^\(?([A-Da-d])\)?\s*(?:[:.)].*)?$")[0].str.upper()
        reason = reason.mask((reason == "") & label.isna(), "answer_label_not_a_to_d")
    out["answer_label"] = label.fillna("")
    reason = reason.mask((reason == "") & (out["question"] == ""), "empty_question")
    folded = {letter: out[letter].str.casefold() for letter in LETTERS}
    same_text = pd.concat([folded[a] == folded[b] for i, a in enumerate(LETTERS) for b in LETTERS[i + 1:]], axis=1)
    reason = reason.mask((reason == "") & same_text.any(axis=1), "duplicate_option_texts")
    # Figure paths are joined to an image root by users' code: refuse anything that could leave it.
    unsafe = out["figure_path"].str.contains(r"(?:^|[\\/])\.\.(?:[\\/]|$)|^[\\/]|^[A-Za-z]:", regex=True)
    reason = reason.mask((reason == "") & unsafe, "unsafe_figure_path")
    reason = reason.mask((reason == "") & out.duplicated(["figure_path", "question", *LETTERS, "answer_label"]),
                         "exact_duplicate")
    return out, reason


def load_traces(path):
    """{question id: the shortest correct trace's reasoning} and counts from a traces.jsonl file.

    Only traces whose parsed answer equals the gold letter and that closed their reasoning within the budget
    are used; the shortest is kept (the cheapest to learn, and the least room for a lucky guess).
    """
    import json

    best, read, correct = {}, 0, 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            trace = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}: a line is not JSON ({line[:60]!r}); regenerate it with --generate_traces")
        read += 1
        if trace["correct"] and trace["finished"] and trace["reasoning"]:
            correct += 1
            if trace["id"] not in best or len(trace["reasoning"]) < len(best[trace["id"]]):
                best[trace["id"]] = trace["reasoning"]
    return best, {"traces_read": read, "traces_correct": correct, "questions_with_correct_trace": len(best)}


def attach_traces(frames, args, dropped):
    """A 'reasoning' column: the chosen trace for training rows that have one, None elsewhere; the training rows
    without a correct trace fall back to the plain completion or are dropped; returns the trace counts."""
    for frame in frames.values():
        frame["reasoning"] = None
    if not args.reasoning_traces:
        return None
    traces, counts = load_traces(args.reasoning_traces)
    train = frames["train"]
    train["reasoning"] = train["id"].map(traces)
    missing = train["reasoning"].isna()
    counts["train_rows_with_trace"] = int((~missing).sum())
    counts["train_rows_without_trace"] = int(missing.sum())
    counts["fallback"] = args.traces_fallback
    if args.traces_fallback == "drop" and missing.any():
        dropped["no_correct_trace"] = dropped.get("no_correct_trace", 0) + int(missing.sum())
        frames["train"] = train[~missing]
    return counts


def split_validation(train, val_ratio, seed):
    """Hold out val_ratio of the figures (not rows): questions on one image never straddle the split."""
    import numpy as np

    figures = train["figure_path"].unique()
    count = max(1, round(len(figures) * val_ratio))  # at least one figure: an empty split breaks training
    held_out = set(np.random.default_rng(seed).permutation(figures)[:count])
    is_val = train["figure_path"].isin(held_out)
    return train[~is_val], train[is_val]


# --- Formatting and tokenization ------------------------------------------------------------------------------
def create_conversation(question, options, letter, prompt_format, reasoning=None):
    """(user turn, completion text) for one row: the format lives in common.PromptFormat, shared with inference.
    reasoning: a trace to think with before the answer (appended as text, so the template cannot delete it)."""
    return prompt_format.user_turn(question, options), prompt_format.completion(letter, options, reasoning)


def tokenize_batch(batch, prompter):
    """datasets.map(batched=True) body: render, tokenize once per batch, mask the prompt in labels. A row the
    prompter cannot use (a VLM's unreadable figure) gets a drop reason and is counted, then dropped."""
    users, completions = [], []
    for question, options, letter, reasoning in zip(batch["question"], batch["options"], batch["answer_label"],
                                                    batch["reasoning"]):
        user, completion = create_conversation(question, options, letter, prompter.format, reasoning)
        users.append(user)
        completions.append(completion)
    prompts, prompt_ids, reasons = prompter.encode_prompts(users, batch["figure_path"])
    completion_ids = prompter.tokenizer(completions, add_special_tokens=False)["input_ids"]
    eos = prompter.tokenizer.eos_token_id
    input_ids = [p + c + [eos] for p, c in zip(prompt_ids, completion_ids)]
    # Labels come from the prompt length, never from input_ids != pad: R1's pad may equal eos.
    labels = [[-100] * len(p) + c + [eos] for p, c in zip(prompt_ids, completion_ids)]
    return {"prompt": prompts, "completion": completions, "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels, "drop_reason": reasons,
            "prompt_length": [len(p) for p in prompt_ids], "completion_length": [len(c) + 1 for c in completion_ids]}


def to_dataset(frame):
    from datasets import Dataset

    frame = frame.assign(options=frame[list(LETTERS)].values.tolist()).drop(columns=list(LETTERS))
    return Dataset.from_pandas(frame, preserve_index=False)


def column(dataset, name):
    """One column as a numpy array, straight from Arrow (row-by-row access costs minutes at 227k rows)."""
    return dataset.data.column(name).to_numpy(zero_copy_only=False)


def percentiles(values):
    import numpy as np

    if not len(values):
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": int(p50), "p95": int(p95), "p99": int(p99), "max": int(np.max(values))}


def letter_counts(labels):
    return {letter: int((labels == letter).sum()) for letter in LETTERS}


def build_splits(sources, args):
    """Clean every source, carve validation (and test, for a single file); return frames and drop counts."""
    dropped, frames, rows_read = {}, {}, 0
    for name, frame in sources.items():
        rows_read += len(frame)
        clean, reason = canonical_rows(frame, f"{args.data_path} [{name}]")
        for why, count in reason[reason != ""].value_counts().items():
            dropped[why] = dropped.get(why, 0) + int(count)
        clean = clean[reason == ""]
        clean.insert(0, "id", [f"{name}-{i}" for i in clean.index])
        frames[name] = clean
    if not len(frames["train"]):
        raise UsageError(f"no usable training rows in {args.data_path} (dropped: {dropped}); check the file "
                         "is PMC-VQA and not corrupted")
    if "test" not in frames:
        frames["train"], frames["test"] = split_validation(frames["train"], args.val_ratio, args.seed + 1)
    if "validation" not in frames:
        frames["train"], frames["validation"] = split_validation(frames["train"], args.val_ratio, args.seed)
    empty = [name for name, frame in frames.items() if not len(frame)]
    if empty:
        raise UsageError(f"no usable rows left for the {' and '.join(empty)} split of {args.data_path} (dropped: "
                         f"{dropped}); splits are carved by figure, so give at least 3 figures with clean rows, or "
                         "a folder with its own test CSV")
    if args.sample_size:
        for name, frame in frames.items():
            if len(frame) > args.sample_size:
                dropped["over_sample_size"] = dropped.get("over_sample_size", 0) + len(frame) - args.sample_size
                frames[name] = frame.sample(n=args.sample_size, random_state=args.seed).sort_index()
    return frames, dropped, rows_read


def tokenize_splits(frames, prompter, args, dropped):
    from datasets import DatasetDict

    splits = DatasetDict()
    for name, frame in frames.items():
        dataset = to_dataset(frame).map(  # worker start-up costs more than it saves on small splits
            tokenize_batch, batched=True, num_proc=args.num_proc if len(frame) >= 2000 else None,
            fn_kwargs={"prompter": prompter}, desc=f"tokenizing {name}")
        reasons = column(dataset, "drop_reason")
        too_long = column(dataset, "prompt_length") + column(dataset, "completion_length") > args.max_length
        reasons[(reasons == "") & too_long] = "longer_than_max_length"
        for why in sorted(set(reasons) - {""}):
            dropped[why] = dropped.get(why, 0) + int((reasons == why).sum())
        if (reasons != "").any():
            dataset = dataset.select((reasons == "").nonzero()[0]).flatten_indices()  # column() sees kept rows
        if not len(dataset):
            raise UsageError(f"no row of the {name} split is usable (dropped: {dropped}); raise --max_length, or "
                             "check --image_root for a vision-language model")
        splits[name] = dataset
    return splits


def preprocessing_stats(splits, dropped, rows_read, prompter, args, trace_counts):
    kept = sum(len(split) for split in splits.values())
    return {
        "rows_read": rows_read, "rows_kept": kept, "rows_dropped": dict(sorted(dropped.items())),
        "splits": {name: len(split) for name, split in splits.items()},
        "token_lengths": {name: {"prompt": percentiles(column(split, "prompt_length")),
                                 "completion": percentiles(column(split, "completion_length"))}
                          for name, split in splits.items()},
        "answer_distribution": {name: letter_counts(column(split, "answer_label")) for name, split in splits.items()},
        "reasoning_traces": trace_counts,
        "config": {"data_path": str(args.data_path), "model_name_or_path": args.model_name_or_path,
                   "max_length": args.max_length, **prompter.format.as_config(),
                   "reads_images": prompter.reads_images,
                   "image_root": str(prompter.image_root.resolve()) if prompter.reads_images else None,
                   "max_pixels": args.max_pixels, "data_version": args.data_version, "val_ratio": args.val_ratio,
                   "seed": args.seed, "test_file": args.test_file, "sample_size": args.sample_size,
                   "reasoning_traces": args.reasoning_traces, "traces_fallback": args.traces_fallback},
    }


def rendered_examples(split, tokenizer, count=3):
    """A few rows as the model sees them, with the trained region decoded from the labels."""
    examples = []
    for row in split.select(range(min(count, len(split)))):
        trained = [t for t in row["labels"] if t != -100]
        examples.append({"id": row["id"], "prompt": row["prompt"], "completion": row["completion"],
                         "trained_text": tokenizer.decode(trained), "answer_label": row["answer_label"],
                         "num_tokens": len(row["input_ids"]), "num_trained_tokens": len(trained)})
    return examples


def save_atomically(splits, stats, examples, output_dir):
    """Write under <output_dir>.incomplete, then swap it in: an interrupted run leaves nothing that looks done."""
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    splits.save_to_disk(str(tmp))
    common.write_json_atomic(tmp / "examples.json", examples)
    common.write_json_atomic(tmp / "preprocessing_stats.json", stats)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def main(argv=None):
    args = parse_args(argv)
    sources, image_root = load_sources(args.data_path, args.test_file, args.data_version)
    frames, dropped, rows_read = build_splits(sources, args)
    trace_counts = attach_traces(frames, args, dropped)
    prompter = model_kinds.Prompter.for_model(args.model_name_or_path, args.include_choices, args.add_reasoning,
                                              args.trust_remote_code, args.image_root or image_root, args.max_pixels)
    splits = tokenize_splits(frames, prompter, args, dropped)
    stats = preprocessing_stats(splits, dropped, rows_read, prompter, args, trace_counts)
    splits = splits.remove_columns(["prompt_length", "completion_length", "reasoning", "drop_reason"])
    save_atomically(splits, stats, rendered_examples(splits["train"], prompter.tokenizer), args.output_dir)

    print(f"read {rows_read} rows, kept {stats['rows_kept']}, dropped {sum(dropped.values())}: {dropped}")
    print(f"splits: {stats['splits']}")
    if prompter.reads_images:
        print(f"figures read from {prompter.image_root}")
    print(f"wrote {args.output_dir}/ (+ examples.json, preprocessing_stats.json)")
    print(f"next: python train_sft_example.py --data_path {args.output_dir} "
          f"--model_name_or_path {args.model_name_or_path}")
    return stats


if __name__ == "__main__":
    common.run_main(main)
