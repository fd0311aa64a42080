"""Ask the fine-tuned model PMC-VQA questions, or evaluate it on the processed test split.

    python inference_example.py                                   # demo: a few questions, answers printed
    python inference_example.py --interactive                     # type questions, watch the answer stream
    python inference_example.py --question "Which organ is shown?" --choices "A:Liver" "B:Spleen"
    python inference_example.py --evaluate --num_samples 500 --method both --compare_base
    python inference_example.py --generate_traces --no_adapter --split train --num_return_sequences 4 \
        --temperature 0.6 --max_new_tokens 1024 --output_file traces.jsonl   # reasoning to fine-tune on

Evaluation methods (same records, same report):
  score     ranks the options by the model's log-probability of each full answer after the training prompt;
            each prompt runs once and its KV cache serves the four answers. Deterministic, no parse failures.
  letter    one forward pass to '...Answer:', then the probabilities of the letters A-D (MMLU-style).
  generate  batched greedy (or sampled, --num_return_sequences votes) generation with left padding, then the
            answer parser of common.py; an unreadable answer and a think block never closed within
            --max_new_tokens are counted apart, never guessed.
score and letter measure the answer distribution without letting the model think: for a reasoning model used
zero-shot, generate with a thinking budget is the fair number.
The report (accuracy with a 95% Wilson interval, failures, confusion, chance and majority-letter baselines,
a collapse warning, questions/s, paired base-vs-fine-tuned statistics with --compare_base, and every
question's record) goes to evaluation_results.json beside the adapter.
"""
import contextlib
import dataclasses
import json
import math
import re
import sys
import time
from collections import Counter
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
    parser = common.make_parser(__doc__)
    arg = parser.add_argument
    arg("--model_name_or_path", default=common.MODEL_PATH, help="base model (default: %(default)s)")
    arg("--adapter_path", default=str(Path(common.OUTPUT_DIR) / "final_model"),
        help="LoRA adapter from train_sft_example.py (default: %(default)s)")
    arg("--no_adapter", action="store_true", help="the base model alone (zero-shot baseline), or a merged model")
    arg("--data_path", default=common.PROCESSED_DIR, help="processed dataset for --evaluate (default: %(default)s)")
    arg("--split", default="test", help="split to evaluate or to generate traces for (default: %(default)s)")
    arg("--output_file", default=None,
        help="results JSON (default: evaluation_results.json beside the adapter, or the model folder with --no_adapter)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true", help="a prompt loop; Ctrl-D or Ctrl-C quits")
    mode.add_argument("--question",
                      help="ask one question, with --choices for options (default: none; the demo questions)")
    mode.add_argument("--evaluate", action="store_true", help="evaluate on --data_path's --split")
    mode.add_argument("--generate_traces", action="store_true",
                      help="sample --num_return_sequences reasoning traces per question of --split and append them "
                           "to --output_file (default traces.jsonl) as JSON lines; a rerun resumes")
    arg("--choices", nargs="+", default=None, metavar="X:TEXT",
        help='options for --question: "A:Liver" "B:Spleen" (default: none, a free-text answer)')
    arg("--num_samples", type=int, default=None, help="evaluate the first N questions (default: all)")
    arg("--method", choices=["score", "letter", "generate", "both", "all"], default="score",
        help="evaluation method; both = score + generate, all = score + letter + generate on the same questions "
             "with their agreement (default: %(default)s)")
    arg("--compare_base", action="store_true", help="also evaluate the base without the adapter, side by side")
    arg("--batch_size", type=int, default=16, help="questions per forward pass (default: %(default)s)")
    arg("--max_new_tokens", type=int, default=256,
        help="generation budget, thinking included: an R1 model that has not closed </think> by then is counted "
             "as 'no answer within budget' (default: %(default)s)")
    arg("--num_return_sequences", type=int, default=1,
        help="samples per question with --temperature > 0; the answer is their majority vote, and the report "
             "adds the mean per-sample accuracy (default: %(default)s)")
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
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0 or args.num_return_sequences < 1:
        raise UsageError("--batch_size, --max_new_tokens and --num_return_sequences must be at least 1, "
                         "--temperature at least 0")
    if args.num_return_sequences > 1 and not args.temperature:
        raise UsageError("--num_return_sequences > 1 needs sampling: add --temperature 0.6 (DeepSeek's advice)")
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
    """Questions of the processed split (id, question, options, answer_label)."""
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
    return split.select_columns(["id", "question", "options", "answer_label"]).to_list()


# --- The three methods ------------------------------------------------------------------------------------
def left_padded(rows, pad_id, device):
    """(input_ids, attention_mask, position_ids) for rows of different lengths, padded on the left so the
    last column is every row's last token; positions count real tokens only, as in training."""
    import torch

    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def token_logprobs(logits, targets):
    """log p(target) at each position, without a float32 log-softmax over [rows, positions, vocab] at once:
    one position at a time, so the extra memory is rows x vocab."""
    import torch

    return torch.stack([torch.log_softmax(logits[:, j].float(), -1).gather(-1, targets[:, j, None])[:, 0]
                        for j in range(logits.shape[1])], dim=1)


def score_options(model, tokenizer, batch, prompt_format):
    """Per question, the summed log-probability of each option's full completion (+ eos) after the prompt.

    Shared-prompt scoring: every prompt runs once (left-padded, batched); its KV cache is then copied to
    one row per option and only the continuations run. The vocabulary-wide work is confined to continuation
    tokens; the prompt's forward keeps the logits of its last position alone.
    """
    import torch

    eos = tokenizer.eos_token_id
    prompts = [prompt_format.prompt_ids(tokenizer, q["question"], q["options"]) for q in batch]
    continuations = [[tokenizer(prompt_format.completion(letter, q["options"]), add_special_tokens=False)["input_ids"]
                      + [eos] for letter in LETTERS[:len(q["options"])]] for q in batch]
    owner = torch.tensor([i for i, options in enumerate(continuations) for _ in options], device=model.device)
    rows = [ids for options in continuations for ids in options]
    input_ids, mask, positions = left_padded(prompts, tokenizer.pad_token_id, model.device)
    width = max(map(len, rows))
    targets = torch.full((len(rows), width), eos, dtype=torch.long, device=model.device)
    new_mask = torch.zeros_like(targets)
    for i, ids in enumerate(rows):  # right padding: continuation token j sits at prompt length + j
        targets[i, :len(ids)] = torch.tensor(ids)
        new_mask[i, :len(ids)] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache = out.cache
        cache.batch_select_indices(owner)
        next_positions = positions[owner, -1:] + 1 + torch.arange(width, device=model.device)
        logits = model(input_ids=targets, attention_mask=torch.cat([mask[owner], new_mask], 1),
                       position_ids=next_positions, cache=cache, use_cache=True).logits
        # token 0 is predicted by the prompt's last position, token j by continuation position j - 1
        logits = torch.cat([out.logits[owner], logits[:, :-1]], 1)
        scores = (token_logprobs(logits, targets) * new_mask).sum(-1).tolist()
    outputs, k = [], 0
    for options in continuations:
        outputs.append(ranked(dict(zip(LETTERS, scores[k:k + len(options)]))))
        k += len(options)
    return outputs


def ranked(option_scores):
    """A scorer's answer: the option with the highest score, and every option's score."""
    return {"predicted": max(option_scores, key=option_scores.get), "option_scores": option_scores}


def letter_token_ids(tokenizer, prompt_format):
    """(ids of the answer head, the one token id of each letter after it), or a UsageError where the
    tokenizer merges a letter with what surrounds it (then only --method score is meaningful)."""
    head_text = prompt_format.answer_head()
    head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
    letters = []
    for letter in LETTERS:
        ids = tokenizer(f"{head_text} {letter}", add_special_tokens=False)["input_ids"]
        if ids[:len(head)] != head or len(ids) != len(head) + 1:
            raise UsageError(f"this tokenizer does not write ' {letter}' after {head_text!r} as one token; "
                             "use --method score")
        letters.append(ids[-1])
    return head, letters


def score_letters(model, tokenizer, batch, prompt_format):
    """MMLU-style: one forward per question over prompt + answer head ('...Answer:'), then the next-token
    log-probabilities of the option letters alone."""
    import torch

    if not prompt_format.include_choices:
        raise UsageError("--method letter needs the options shown (preprocessed without --no_include_choices); "
                         "use --method score")
    head, letter_ids = letter_token_ids(tokenizer, prompt_format)
    rows = [prompt_format.prompt_ids(tokenizer, q["question"], q["options"]) + head for q in batch]
    input_ids, mask, positions = left_padded(rows, tokenizer.pad_token_id, model.device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
    logprobs = torch.log_softmax(logits[:, -1].float(), -1)[:, letter_ids].tolist()
    return [ranked(dict(zip(LETTERS, row[:len(question["options"])]))) for question, row in zip(batch, logprobs)]


def generated_length(ids, eos):
    """Tokens a sample used, its eos included (what follows is padding)."""
    return ids.index(eos) + 1 if eos in ids else len(ids)


def generate_answers(model, tokenizer, batch, prompt_format, args, streamer=None):
    """Batched generation from left-padded prompts, --num_return_sequences samples per question.

    Each sample is 'answered', 'unparsed' (text after the think block that names no option) or
    'no_answer_within_budget' (a think block the model never closed within --max_new_tokens). With several
    samples the prediction is their majority vote over parsed letters (ties: the answer seen first).
    """
    import torch

    prompts = [prompt_format.prompt_ids(tokenizer, q["question"], q["options"]) for q in batch]
    input_ids, mask, _ = left_padded(prompts, tokenizer.pad_token_id, model.device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    k = args.num_return_sequences
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             streamer=streamer, num_return_sequences=k, **sampling)
    new_tokens = out[:, input_ids.shape[1]:].tolist()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    outputs = []
    for i, question in enumerate(batch):
        samples = []
        for text, ids in zip(texts[i * k:(i + 1) * k], new_tokens[i * k:(i + 1) * k]):
            answer = prompt_format.answer_part(text)
            letter = None if answer is None else common.parse_answer_letter(answer, question["options"])
            status = "no_answer_within_budget" if answer is None else "answered" if letter else "unparsed"
            samples.append({"text": text, "predicted": letter, "status": status,
                            "tokens": generated_length(ids, tokenizer.eos_token_id),
                            "finished": tokenizer.eos_token_id in ids})
        votes = Counter(sample["predicted"] for sample in samples if sample["predicted"])
        outputs.append({"predicted": votes.most_common(1)[0][0] if votes else None, "samples": samples})
    return outputs


METHODS = {"score": score_options, "letter": score_letters}


# --- Evaluation -------------------------------------------------------------------------------------------
def wilson_interval(correct, n, z=1.959964):
    """95% Wilson score interval for a proportion; honest near 0 and 1 and for small n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


COLLAPSE_SHARE = 0.8  # one letter taking this share of the predictions is a collapsed model, not an answer


def prediction_spread(records):
    """The predicted letters' distribution and a warning when one letter takes >= COLLAPSE_SHARE of them
    (a fine-tune can lower its loss while answering 'B' to everything)."""
    predicted = [r["predicted"] for r in records if r["predicted"]]
    shares = {letter: predicted.count(letter) / len(predicted) if predicted else 0.0 for letter in LETTERS}
    top = max(shares, key=shares.get)
    gold_share = sum(r["gold"] == top for r in records) / len(records) if records else 0.0
    collapsed = shares[top] >= COLLAPSE_SHARE and gold_share < COLLAPSE_SHARE
    warning = (f"collapsed: {shares[top]:.0%} of predictions are {top} (gold {top}: {gold_share:.0%}); "
               "the model answers one letter, not the question") if collapsed else None
    return {"most_predicted_letter": top, "most_predicted_share": shares[top], "prediction_distribution": shares,
            "collapse_warning": warning}


def summarize(records, seconds):
    n = len(records)
    correct = sum(r["correct"] for r in records)
    golds = [r["gold"] for r in records]
    majority = max(LETTERS, key=golds.count) if n else None
    confusion = {g: {p: 0 for p in [*LETTERS, "unparsed"]} for g in LETTERS}
    for r in records:
        confusion[r["gold"]][r["predicted"] or "unparsed"] += 1
    samples = [s for r in records for s in r.get("samples") or []]
    statuses = Counter(s["status"] for s in samples)
    low, high = wilson_interval(correct, n)
    summary = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [low, high],
               "parse_failures": statuses["unparsed"],
               "parse_failure_rate": statuses["unparsed"] / len(samples) if samples else 0.0,
               "no_answer_within_budget": statuses["no_answer_within_budget"],
               "no_answer_within_budget_rate": statuses["no_answer_within_budget"] / len(samples) if samples else 0.0,
               "chance_baseline": sum(1 / len(r["options"]) for r in records) / n if n else 0.0,
               "majority_letter": majority, "majority_letter_baseline": golds.count(majority) / n if n else 0.0,
               **prediction_spread(records),
               "questions_per_second": n / seconds if seconds else None, "confusion": confusion}
    if samples:
        right = [s["predicted"] == r["gold"] for r in records for s in r["samples"]]
        summary["mean_sample_accuracy"] = sum(right) / len(right)
        summary["mean_generated_tokens"] = sum(s["tokens"] for s in samples) / len(samples)
    return summary


def evaluate(model, tokenizer, questions, prompt_format, method, args):
    """Run one method over the questions in batches; per-question records and their summary."""
    from tqdm import tqdm

    records, start = [], time.time()
    with tqdm(total=len(questions), desc=method, unit="q", disable=None) as bar:
        for i in range(0, len(questions), args.batch_size):
            batch = questions[i:i + args.batch_size]
            if method == "generate":
                answers = generate_answers(model, tokenizer, batch, prompt_format, args)
            else:
                answers = METHODS[method](model, tokenizer, batch, prompt_format)
            for item, answer in zip(batch, answers):
                records.append({"id": item["id"], "question": item["question"], "options": item["options"],
                                "gold": item["answer_label"], "predicted": answer["predicted"],
                                "correct": answer["predicted"] == item["answer_label"],
                                "option_scores": answer.get("option_scores"), "samples": answer.get("samples")})
            bar.update(len(batch))
    return {**summarize(records, time.time() - start), "records": records}


def paired_comparison(tuned, base, resamples=10_000, seed=0):
    """Fine-tuned minus base accuracy on the same questions: a paired bootstrap 95% interval and the exact
    McNemar p-value (two-sided binomial test on the discordant pairs)."""
    import numpy as np

    base_right = {r["id"]: r["correct"] for r in base["records"]}
    diff = np.array([int(r["correct"]) - int(base_right[r["id"]]) for r in tuned["records"]])
    only_tuned, only_base = int((diff == 1).sum()), int((diff == -1).sum())
    means = np.random.default_rng(seed).choice(diff, size=(resamples, len(diff))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    discordant = only_tuned + only_base
    tail = sum(math.comb(discordant, i) for i in range(min(only_tuned, only_base) + 1)) / 2 ** discordant
    return {"n": len(diff), "accuracy_difference": float(diff.mean()), "bootstrap_ci95": [float(low), float(high)],
            "only_fine_tuned_correct": only_tuned, "only_base_correct": only_base,
            "mcnemar_exact_p": min(1.0, 2 * tail)}


def agreement(results):
    """Share of questions on which two methods predict the same letter, for every pair of methods run."""
    predictions = {name: [r["predicted"] for r in result["records"]] for name, result in results.items()}
    return {a: {b: sum(x == y for x, y in zip(predictions[a], predictions[b])) / len(predictions[a])
                for b in predictions} for a in predictions}


def evaluate_all(model, tokenizer, prompt_format, args):
    questions = load_eval_questions(args)
    methods = {"both": ["score", "generate"], "all": ["score", "letter", "generate"]}.get(args.method, [args.method])
    models = {"base" if args.no_adapter else "fine_tuned": contextlib.nullcontext}
    if args.compare_base:
        models["base"] = model.disable_adapter  # the same weights with LoRA switched off: no second load
    results = {}
    for name, context in models.items():
        with context():
            for method in methods:
                results[f"{name}/{method}"] = evaluate(model, tokenizer, questions, prompt_format, method, args)
    report = {"results": results}
    if args.compare_base:
        report["paired"] = {method: paired_comparison(results[f"fine_tuned/{method}"], results[f"base/{method}"])
                            for method in methods}
    if len(methods) > 1:
        report["agreement"] = {name: agreement({m: results[f"{name}/{m}"] for m in methods}) for name in models}
    return report


def print_report(report):
    results = report["results"]
    print(f"{'model/method':<22}{'n':>6}{'accuracy':>10}{'95% CI':>17}{'unparsed':>10}{'no answer':>10}"
          f"{'majority':>10}{'q/s':>9}")
    for name, r in results.items():
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        print(f"{name:<22}{r['n']:>6}{r['accuracy']:>10.3f}{ci:>17}{r['parse_failure_rate']:>10.3f}"
              f"{r['no_answer_within_budget_rate']:>10.3f}{r['majority_letter_baseline']:>10.3f}"
              f"{r['questions_per_second']:>9.1f}")
    first = next(iter(results.values()))
    print(f"chance baseline {first['chance_baseline']:.3f}; majority letter {first['majority_letter']} "
          f"{first['majority_letter_baseline']:.3f}")
    for name, r in results.items():
        if r["collapse_warning"]:
            print(f"WARNING {name}: {r['collapse_warning']}")
        if "mean_sample_accuracy" in r and r["n"] and len(r["records"][0]["samples"]) > 1:
            print(f"{name}: majority vote {r['accuracy']:.3f}, mean per sample {r['mean_sample_accuracy']:.3f}")
    for method, p in report.get("paired", {}).items():
        print(f"fine_tuned - base ({method}): {p['accuracy_difference']:+.3f} [{p['bootstrap_ci95'][0]:+.3f}, "
              f"{p['bootstrap_ci95'][1]:+.3f}] paired bootstrap 95%; McNemar exact p = {p['mcnemar_exact_p']:.3g} "
              f"({p['only_fine_tuned_correct']} vs {p['only_base_correct']} discordant)")
    if any(r.get("mean_generated_tokens") for r in results.values()):
        print("note: score and letter rank the options without letting the model think; for a reasoning model "
              "used zero-shot, generate with a thinking budget is the fair number")


# --- Modes ------------------------------------------------------------------------------------------------
def answer_and_show(model, tokenizer, question, options, args, prompt_format):
    from transformers import TextStreamer

    print(f"\nQ: {question}")
    for letter, text in zip(LETTERS, options):
        print(f"   {letter}: {text}")
    print("model: ", end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    [answer] = generate_answers(model, tokenizer, [{"question": question, "options": options}], prompt_format,
                                args, streamer)
    print(f"-> parsed answer: {answer['predicted'] or answer['samples'][0]['status']}")


def interactive(model, tokenizer, args, prompt_format):
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
        answer_and_show(model, tokenizer, question, options, args, prompt_format)


# --- Reasoning traces (rejection-sampling fine-tuning: QUICKSTART_GUIDE.md, "Keep the reasoning") ------------
def resume_traces(path, k):
    """Ids already complete in a traces file (k samples each), after rewriting the file without the lines of an
    interrupted question or a half-written last line, so a resumed run never duplicates a line."""
    lines = [line for line in path.read_text().split("\n") if line.strip()] if path.exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the half-written line of a killed run
            continue
    per_id = Counter(r["id"] for r in records)
    done = {question_id for question_id, count in per_id.items() if count >= k}
    kept = [r for r in records if r["id"] in done]
    if len(kept) != len(lines):
        common.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return done


def generate_traces(model, tokenizer, prompt_format, args):
    """Append k sampled traces per question to the traces file, one JSON line each, flushed per question."""
    from tqdm import tqdm

    path = Path(args.output_file or "traces.jsonl")
    done = resume_traces(path, args.num_return_sequences)
    questions = [q for q in load_eval_questions(args) if q["id"] not in done]
    solved, start = 0, time.time()
    print(f"{len(done)} questions already in {path}; generating for {len(questions)}")
    with open(path, "a", encoding="utf-8") as out, tqdm(total=len(questions), unit="q", disable=None) as bar:
        for i in range(0, len(questions), args.batch_size):
            batch = questions[i:i + args.batch_size]
            for question, answer in zip(batch, generate_answers(model, tokenizer, batch, prompt_format, args)):
                for index, sample in enumerate(answer["samples"]):
                    reasoning, answer_text = prompt_format.split_reasoning(sample["text"])
                    out.write(json.dumps({"id": question["id"], "sample": index, "reasoning": reasoning,
                                          "answer": answer_text, "predicted": sample["predicted"],
                                          "gold": question["answer_label"],
                                          "correct": sample["predicted"] == question["answer_label"],
                                          "tokens": sample["tokens"], "finished": sample["finished"]},
                                         ensure_ascii=False) + "\n")
                out.flush()
                solved += any(s["predicted"] == question["answer_label"] for s in answer["samples"])
            bar.update(len(batch))
            bar.set_postfix(with_correct_trace=f"{solved / min(i + len(batch), len(questions)):.0%}")
    seconds = time.time() - start
    print(f"{solved} of {len(questions)} new questions have a correct trace; "
          f"{len(questions) / seconds if seconds else 0:.2f} questions/s; wrote {path}")
    print(f"next: python preprocess_pmc_vqa_for_sft.py --reasoning_traces {path} ...")


def main(argv=None):
    args = parse_args(argv)
    options = parse_choices(args.choices) if args.question and args.choices else None
    model, tokenizer = load_model(args)
    if (Path(args.data_path) / "preprocessing_stats.json").exists() or args.evaluate or args.generate_traces:
        prompt_format = common.PromptFormat.from_processed(args.data_path, tokenizer)  # ask as training did
    else:
        prompt_format = common.PromptFormat.for_tokenizer(tokenizer)

    if args.evaluate:
        report = evaluate_all(model, tokenizer, prompt_format, args)
        print_report(report)
        beside = Path(args.model_name_or_path if args.no_adapter else args.adapter_path)
        output = Path(args.output_file or (beside if beside.is_dir() else Path(".")) / "evaluation_results.json")
        common.write_json_atomic(output, {"model_name_or_path": args.model_name_or_path,
                                          "adapter_path": None if args.no_adapter else args.adapter_path,
                                          "data_path": args.data_path, "split": args.split,
                                          "prompt_format": prompt_format.as_config(), **report})
        print(f"wrote {output}")
    elif args.generate_traces:
        generate_traces(model, tokenizer, prompt_format, args)
    elif args.interactive:
        interactive(model, tokenizer, args, prompt_format)
    elif args.question:
        # shown to the model only if training showed options too; the parser matches its answer either way
        shown = dataclasses.replace(prompt_format, include_choices=prompt_format.include_choices and bool(options))
        answer_and_show(model, tokenizer, args.question, options or [], args, shown)
    else:
        for question, options in DEMO_QUESTIONS:
            answer_and_show(model, tokenizer, question, options, args, prompt_format)


if __name__ == "__main__":
    common.run_main(main)
