"""Self-check before a long job: preprocess 10 rows of each split of your data and verify the format invariants.

    python test_preprocessing.py                                    # your PMC-VQA folder and model (common.py)
    python test_preprocessing.py --data_path demo_assets/PMC-VQA --model_name_or_path demo_assets/tiny-r1-llama
    python test_preprocessing.py --data_path demo_assets/PMC-VQA-images --model_name_or_path demo_assets/tiny-llava
    python test_preprocessing.py --data_path PMC-VQA --model_name_or_path models/qwen2.5-vl-7b \\
        @configs/qwen2.5-vl-7b/preprocess.args                     # a VLM, with its preprocessing recipe

Runs the real preprocessing into a temporary folder, prints two examples with the trained region marked
[[like this]], and checks what training relies on: no bos beyond the template's; prompt ids equal to the ids
inference feeds the model (a vision-language model's figure included); labels -100 on the prompt, every
completion token trained, eos last; the answer parser reads each completion back to its gold letter. Exit
status 0 = all good, 1 = a broken invariant (the message says which), 2 = bad input.
"""
import contextlib
import io
import sys
import tempfile

import common
import model_kinds


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--data_path", default=common.PMC_VQA_DIR, help="PMC-VQA folder or CSV (default: %(default)s)")
    parser.add_argument("--model_name_or_path", default=common.MODEL_PATH,
                        help="tokenizer to use (default: %(default)s)")
    common.add_switch(parser, "add_reasoning", False, "check the format of --add_reasoning")
    common.add_switch(parser, "include_choices", True, "check the format with the options shown")
    parser.add_argument("--image_root", default=None,
                        help="a vision-language model's figures (default: as preprocess_pmc_vqa_for_sft.py)")
    parser.add_argument("--max_pixels", type=int, default=None,
                        help="a Qwen-VL figure's pixel cap, as preprocess_pmc_vqa_for_sft.py takes it (its recipe "
                             "configs/qwen2.5-vl-7b/preprocess.args sets it) (default: the processor's own)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the model folder to run its own code")
    parser.add_argument("--num_rows", type=int, default=10, help="rows per split to process (default: %(default)s)")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.num_rows < 1:
        raise common.UsageError(f"--num_rows must be at least 1, got {args.num_rows}")
    return args


def check_row(row, prompter):
    """The broken invariants of one processed row, as readable sentences (empty when all hold)."""
    problems, tokenizer = [], prompter.tokenizer
    ids, labels = row["input_ids"], row["labels"]
    prompt_ids = prompter.prompt_ids(row)
    n = len(prompt_ids)
    bos = tokenizer.bos_token_id  # the prompt ids are the rendered template's: whatever bos it wrote, no more
    if bos is not None and ids.count(bos) != prompt_ids.count(bos):
        problems.append("tokenization added a bos the template did not write (a double bos)")
    if ids[:n] != prompt_ids:
        problems.append("the prompt ids differ from what inference feeds the model")
    if any(label != -100 for label in labels[:n]):
        problems.append("a prompt token is trained")
    if labels[n:] != ids[n:] or not labels[n:]:
        problems.append("a completion token is not trained")
    if ids[-1] != tokenizer.eos_token_id or labels[-1] != tokenizer.eos_token_id:
        problems.append("the row does not end with a trained eos")
    image_token = getattr(prompter.processor, "image_token_id", None)
    if image_token is not None and image_token in [label for label in labels if label != -100]:
        problems.append("an image token is trained")
    if prompter.format.parse(row["completion"], row["options"]) != row["answer_label"]:
        problems.append("the parser does not read the completion back to the gold letter")
    return problems


def show(row, tokenizer):
    """The row's text with the trained region in [[ ]]."""
    n = sum(label == -100 for label in row["labels"])
    print(f"--- {row['id']} (gold {row['answer_label']}) ---")
    print(tokenizer.decode(row["input_ids"][:n]) + "[[" + tokenizer.decode(row["input_ids"][n:]) + "]]\n")


def main(argv=None):
    args = parse_args(argv)
    from datasets import load_from_disk

    import preprocess_pmc_vqa_for_sft as preprocess

    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--data_path", args.data_path, "--model_name_or_path", args.model_name_or_path,
                 "--output_dir", f"{tmp}/processed", "--sample_size", str(args.num_rows), "--num_proc", "1",
                 "--add_reasoning" if args.add_reasoning else "--no_add_reasoning",
                 "--include_choices" if args.include_choices else "--no_include_choices"]
        flags += ["--image_root", args.image_root] * bool(args.image_root) + ["--trust_remote_code"] * \
            args.trust_remote_code + ["--max_pixels", str(args.max_pixels)] * bool(args.max_pixels)
        with contextlib.redirect_stdout(io.StringIO()):  # its "next:" line would point into this temporary folder
            stats = preprocess.main(flags)
        splits = load_from_disk(f"{tmp}/processed")
        prompter = model_kinds.Prompter.from_processed(f"{tmp}/processed", args.model_name_or_path,
                                                       args.trust_remote_code)
        for row in splits["train"].select(range(min(2, len(splits["train"])))):
            show(row, prompter.tokenizer)
        failures = [f"{row['id']}: {problem}" for split in splits.values() for row in split
                    for problem in check_row(row, prompter)]
    dropped = sum(stats["rows_dropped"].values())
    if stats["rows_read"] != stats["rows_kept"] + dropped:
        failures.append(f"rows_read {stats['rows_read']} != rows_kept {stats['rows_kept']} + dropped {dropped}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
    checked = sum(len(split) for split in splits.values())
    print(f"OK: {checked} rows checked in {sorted(splits)} ({args.num_rows} per split at most; dropped "
          f"{stats['rows_dropped'] or 'none'}); every invariant holds")


if __name__ == "__main__":
    common.run_main(main)
