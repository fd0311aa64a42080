"""Ask the fine-tuned model PMC-VQA questions, or evaluate it on the processed test split.

    python inference_example.py                                   # demo: a few questions, answers printed
    python inference_example.py --interactive                     # type questions, watch the answer stream
    python inference_example.py --question "Which organ is shown?" --choices "A:Liver" "B:Spleen"
    python inference_example.py --evaluate --num_samples 500 --method both --compare_base

Evaluation methods (same records, same report):
  score     ranks the options by the model's log-probability of each answer continuation after the
            training prompt: one batched forward pass per question, deterministic, no parse failures.
  generate  batched greedy (or sampled) generation with left padding, then the answer parser of common.py;
            an answer it cannot read is a counted parse failure, never a guess.
The report (accuracy with a 95% Wilson interval, parse failures, confusion, chance and majority-letter
baselines, questions/s, and every question's record) goes to evaluation_results.json beside the adapter.
"""
import argparse
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path

import common
from common import LETTERS, UsageError

DEMO_QUESTIONS = [
    ("What is the most likely diagnosis given a dural tail sign on this MRI?",
     ["Meningioma", "Brain abscess", "Sarcoidosis", "Pneumothorax"]),
    ("This CT scan image shows a spiculated pulmonary nodule. Which condition is most likely?",
     ["Hepatic hemangioma", "Lung carcinoma", "Crohn disease", "Thalassemia"]),
    ("Which disease best explains a boot-shaped heart in the X-ray?",
     ["Pericardial effusion", "Osteosarcoma", "Tetralogy of Fallot", "Graves disease"]),
]


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    arg("--model_name_or_path", default=common.MODEL_PATH, help="base model (default: %(default)s)")
    arg("--adapter_path", default=str(Path(common.OUTPUT_DIR) / "final_model"),
        help="LoRA adapter from train_sft_example.py (default: %(default)s)")
    arg("--no_adapter", action="store_true", help="the base model alone (zero-shot baseline), or a merged model")
    arg("--data_path", default=common.PROCESSED_DIR, help="processed dataset for --evaluate (default: %(default)s)")
    arg("--split", default="test", help="split to evaluate (default: %(default)s)")
    arg("--output_file", default=None,
        help="results JSON (default: evaluation_results.json beside the adapter, or the model folder with --no_adapter)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true", help="a prompt loop; Ctrl-D or Ctrl-C quits")
    mode.add_argument("--question",
                      help="ask one question, with --choices for options (default: none; the demo questions)")
    mode.add_argument("--evaluate", action="store_true", help="evaluate on --data_path's --split")
    arg("--choices", nargs="+", default=None, metavar="X:TEXT",
        help='options for --question: "A:Liver" "B:Spleen" (default: none, a free-text answer)')
    arg("--num_samples", type=int, default=None, help="evaluate the first N questions (default: all)")
    arg("--method", choices=["score", "generate", "both"], default="score",
        help="evaluation method (default: %(default)s)")
    arg("--compare_base", action="store_true", help="also evaluate the base without the adapter, side by side")
    arg("--batch_size", type=int, default=16, help="questions per forward pass (default: %(default)s)")
    arg("--max_new_tokens", type=int, default=256, help="generation budget (default: %(default)s)")
    arg("--temperature", type=float, default=0.0,
        help="0 = greedy; DeepSeek recommends 0.6 with top_p 0.95 for sampling (default: %(default)s)")
    arg("--top_p", type=float, default=0.95, help="nucleus sampling when --temperature > 0 (default: %(default)s)")
    arg("--load_in_8bit", action="store_true", help="load the base in 8-bit")
    arg("--load_in_4bit", action="store_true", help="load the base in 4-bit nf4")
    arg("--trust_remote_code", action="store_true", help="allow the model folder to run its own code")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.load_in_8bit and args.load_in_4bit:
        raise UsageError("--load_in_8bit and --load_in_4bit are exclusive; pick one")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise UsageError("--batch_size and --max_new_tokens must be at least 1, --temperature at least 0")
    if args.choices is not None and not args.question:
        raise UsageError("--choices goes with --question")
    if args.compare_base and args.no_adapter:
        raise UsageError("--compare_base compares the adapter with the base; drop --no_adapter")
    return args


def parse_choices(choices):
    """["A:Liver", "B: Spleen"] -> ["Liver", "Spleen"], letters in order A, B, ..."""
    options = []
    for letter, choice in zip(LETTERS, choices):
        head, sep, text = choice.partition(":")
        if not sep or head.strip().upper() != letter or not text.strip():
            raise UsageError(f'--choices: expected "{letter}:text", got {choice!r}')
        options.append(text.strip())
    if len(choices) > len(LETTERS) or len(options) < 2:
        raise UsageError(f"--choices takes 2 to {len(LETTERS)} options, got {len(choices)}")
    return options


# --- Loading ----------------------------------------------------------------------------------------------
def load_model(args):
    """Base model (+ adapter unless --no_adapter), in the precision training used on this hardware."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter = None if args.no_adapter else Path(args.adapter_path)
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        raise UsageError(f"no LoRA adapter at {adapter} (adapter_config.json missing); train one with "
                         f"python train_sft_example.py, or pass --no_adapter for the base model")
    tokenizer = common.load_tokenizer(str(adapter or args.model_name_or_path), args.trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues from the last token of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = common.pick_dtype()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=dtype, device_map="auto" if torch.cuda.is_available() else None,
        quantization_config=common.quantization_config(args.load_in_4bit, args.load_in_8bit, dtype),
        trust_remote_code=args.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), tokenizer


def load_eval_questions(args):
    """Questions of the processed split, and the prompt settings preprocessing used for them."""
    from datasets import load_from_disk

    path = Path(args.data_path)
    if not (path / "dataset_dict.json").exists():
        raise UsageError(f"{path} is not a processed dataset; run python preprocess_pmc_vqa_for_sft.py "
                         f"--output_dir {path}")
    splits = load_from_disk(str(path))
    if args.split not in splits:
        raise UsageError(f"{path} has no split {args.split!r}; it has {sorted(splits)}")
    split = splits[args.split]
    if args.num_samples:
        split = split.select(range(min(args.num_samples, len(split))))
    config = json.loads((path / "preprocessing_stats.json").read_text())["config"]
    return split.select_columns(["id", "question", "options", "answer_label"]).to_list(), config


# --- The two methods --------------------------------------------------------------------------------------
def prompt_token_ids(tokenizer, question, options, config):
    """What the model is fed for a question: the very ids training put before each completion."""
    return common.prompt_token_ids(tokenizer, question, options, config["include_choices"], config["add_reasoning"])


def score_options(model, tokenizer, batch, config):
    """Per question, the summed log-probability of each option's full completion (+ eos) after the prompt."""
    import torch

    rows, spans = [], []
    for item in batch:
        prompt = prompt_token_ids(tokenizer, item["question"], item["options"], config)
        for letter in LETTERS[:len(item["options"])]:
            completion = common.build_completion(letter, item["options"], config["include_choices"],
                                                 config["add_reasoning"])
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt + ids)
            spans.append((len(prompt), len(prompt) + len(ids)))
    width = max(map(len, rows))
    device = model.device
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, device=device)
    attention = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # right padding: positions stay 0..n-1 as in training
        input_ids[i, :len(row)] = torch.tensor(row, device=device)
        attention[i, :len(row)] = 1
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
    scores = [logprobs[i, start - 1:end - 1].gather(-1, input_ids[i, start:end, None]).sum().item()
              for i, (start, end) in enumerate(spans)]
    outputs, k = [], 0
    for item in batch:
        n = len(item["options"])
        option_scores = scores[k:k + n]
        k += n
        best = max(range(n), key=option_scores.__getitem__)
        outputs.append((LETTERS[best], json.dumps({l: round(s, 3) for l, s in zip(LETTERS, option_scores)})))
    return outputs


def generate_answers(model, tokenizer, batch, config, args, streamer=None):
    """Batched generation from left-padded prompts; returns (parsed letter or None, generated text)."""
    import torch

    prompts = [prompt_token_ids(tokenizer, item["question"], item["options"], config) for item in batch]
    padded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        out = model.generate(**padded, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling)
    texts = tokenizer.batch_decode(out[:, padded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [(common.parse_answer_letter(text, item["options"]), text) for item, text in zip(batch, texts)]


# --- Evaluation -------------------------------------------------------------------------------------------
def wilson_interval(correct, n, z=1.959964):
    """95% Wilson score interval for a proportion; honest near 0 and 1 and for small n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(records, seconds):
    n = len(records)
    correct = sum(r["correct"] for r in records)
    golds = [r["gold"] for r in records]
    majority = max(LETTERS, key=golds.count) if n else None
    confusion = {g: {p: 0 for p in [*LETTERS, "unparsed"]} for g in LETTERS}
    for r in records:
        confusion[r["gold"]][r["predicted"] or "unparsed"] += 1
    low, high = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [low, high],
            "parse_failures": sum(r["predicted"] is None for r in records),
            "parse_failure_rate": sum(r["predicted"] is None for r in records) / n if n else 0.0,
            "chance_baseline": sum(1 / len(r["options"]) for r in records) / n if n else 0.0,
            "majority_letter": majority, "majority_letter_baseline": golds.count(majority) / n if n else 0.0,
            "questions_per_second": n / seconds if seconds else None, "confusion": confusion}


def evaluate(model, tokenizer, questions, config, method, args):
    from tqdm import tqdm

    records, start = [], time.time()
    for i in tqdm(range(0, len(questions), args.batch_size), desc=method, disable=not sys.stderr.isatty()):
        batch = questions[i:i + args.batch_size]
        answers = score_options(model, tokenizer, batch, config) if method == "score" else \
            generate_answers(model, tokenizer, batch, config, args)
        for item, (predicted, raw) in zip(batch, answers):
            records.append({"id": item["id"], "question": item["question"], "options": item["options"],
                            "gold": item["answer_label"], "predicted": predicted, "raw_output": raw,
                            "correct": predicted == item["answer_label"]})
    return {**summarize(records, time.time() - start), "records": records}


def evaluate_all(model, tokenizer, args):
    questions, config = load_eval_questions(args)
    methods = ["score", "generate"] if args.method == "both" else [args.method]
    models = {"base" if args.no_adapter else "fine_tuned": contextlib.nullcontext}
    if args.compare_base:
        models["base"] = model.disable_adapter  # the same weights with LoRA switched off: no second load
    results = {}
    for name, context in models.items():
        with context():
            for method in methods:
                results[f"{name}/{method}"] = evaluate(model, tokenizer, questions, config, method, args)
    return results


def print_report(results):
    print(f"{'model/method':<22}{'n':>6}{'accuracy':>10}{'95% CI':>17}{'unparsed':>10}{'majority':>10}{'q/s':>9}")
    for name, r in results.items():
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        print(f"{name:<22}{r['n']:>6}{r['accuracy']:>10.3f}{ci:>17}{r['parse_failure_rate']:>10.3f}"
              f"{r['majority_letter_baseline']:>10.3f}{r['questions_per_second']:>9.1f}")
    first = next(iter(results.values()))
    print(f"chance baseline {first['chance_baseline']:.3f}; majority letter {first['majority_letter']} "
          f"{first['majority_letter_baseline']:.3f}")


# --- Modes ------------------------------------------------------------------------------------------------
def answer_and_show(model, tokenizer, question, options, args, config):
    from transformers import TextStreamer

    print(f"\nQ: {question}")
    for letter, text in zip(LETTERS, options):
        print(f"   {letter}: {text}")
    print("model: ", end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    [(letter, _)] = generate_answers(model, tokenizer, [{"question": question, "options": options}], config,
                                     args, streamer)
    print(f"-> parsed answer: {letter or 'unparsed'}")


def interactive(model, tokenizer, args, config):
    """A REPL over plain text: nothing typed is ever evaluated or executed."""
    print("Type a question, then its options one per line as 'A: text' and an empty line. Ctrl-D quits.")
    while True:
        try:
            question = input("\nquestion> ").strip()
            if not question:
                continue
            options = []
            while len(options) < len(LETTERS):
                letter = LETTERS[len(options)]
                line = input(f"option {letter}> ").strip()
                if not line:
                    break
                options.append(re.sub(rf"^{letter}\s*[:.)]\s*", "", line, flags=re.I))
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if len(options) < 2:
            print("error: give at least two options")
            continue
        answer_and_show(model, tokenizer, question, options, args, config)


def main(argv=None):
    args = parse_args(argv)
    options = parse_choices(args.choices) if args.question and args.choices else None
    config = {"include_choices": True, "add_reasoning": False}
    stats = Path(args.data_path) / "preprocessing_stats.json"
    if stats.exists():  # ask in the format the model was trained on
        config = json.loads(stats.read_text())["config"]
    model, tokenizer = load_model(args)

    if args.evaluate:
        results = evaluate_all(model, tokenizer, args)
        print_report(results)
        beside = Path(args.model_name_or_path if args.no_adapter else args.adapter_path)
        output = Path(args.output_file or (beside if beside.is_dir() else Path(".")) / "evaluation_results.json")
        common.write_json_atomic(output, {"model_name_or_path": args.model_name_or_path,
                                          "adapter_path": None if args.no_adapter else args.adapter_path,
                                          "data_path": args.data_path, "split": args.split,
                                          "prompt_config": config, "results": results})
        print(f"wrote {output}")
    elif args.interactive:
        interactive(model, tokenizer, args, config)
    elif args.question:
        # shown to the model only if training showed options too; the parser matches its answer either way
        answer_and_show(model, tokenizer, args.question, options or [], args,
                        {**config, "include_choices": config["include_choices"] and bool(options)})
    else:
        for question, options in DEMO_QUESTIONS:
            answer_and_show(model, tokenizer, question, options, args, config)


if __name__ == "__main__":
    common.run_main(main)
