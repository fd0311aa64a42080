"""Ask the fine-tuned model PMC-VQA questions, or evaluate it on the processed test split.

    python inference_example.py                                   # demo: a few questions, answers printed
    python inference_example.py --interactive                     # type questions, watch the answer stream
    python inference_example.py --question "Which organ is shown?" --choices "A:Liver" "B:Spleen"
    python inference_example.py --evaluate --num_samples 500 --method both --compare_base
    python inference_example.py --evaluate --compare_base --image_control blank   # a VLM: how much the figure adds
    python inference_example.py --question "Which organ is shown?" --choices "A:Liver" "B:Spleen" --image fig.jpg
    python inference_example.py --report vlm=a/evaluation_results.json text_only=b/evaluation_results.json \\
        --html both.html                                          # one table and one page for two runs
    python inference_example.py --generate_traces --no_adapter --split train --num_return_sequences 4 \\
        --temperature 0.6 --max_new_tokens 1024 --output_file traces.jsonl   # reasoning to fine-tune on
    python inference_example.py --evaluate --method generate --server http://127.0.0.1:8000 --max_new_tokens 2048

Evaluation methods (same records, same report):
  score     ranks the options by the model's log-probability of each full answer after the training prompt;
            each prompt runs once and its KV cache serves the four answers. Deterministic, no parse failures.
  letter    one forward pass to '...Answer:', then the probabilities of the letters A-D (MMLU-style).
  generate  batched greedy (or sampled, --num_return_sequences votes) generation with left padding, then the
            answer parser of common.py; an unreadable answer and a think block never closed within
            --max_new_tokens are counted apart, never guessed.
score and letter measure the answer distribution without letting the model think: for a reasoning model used
zero-shot, generate with a thinking budget is the fair number.
A vision-language model (preprocessed for one) sees each question's figure in every method; with
--image_control blank every method runs again with a black image of the same size in each figure's place,
and the report pairs the two: what the model gets from the image.
The report (accuracy with a 95% Wilson interval, failures, confusion, chance and majority-letter baselines,
a collapse warning, questions/s, paired base-vs-fine-tuned statistics with --compare_base, and every
question's record) goes to evaluation_results.json beside the adapter, and evaluation_report.html beside it
shows it all in a browser, from disk: figures, reasoning, filters, confusion, calibration (evaluation_page.py).
--server URL hands generation to a serving engine (vLLM, SGLang, `transformers serve`) that already serves the
model: generation.py says how, QUICKSTART_GUIDE.md ("Evaluation at scale") how to start one. Under
torchrun --nproc_per_node N, --evaluate splits the questions across N processes (data_parallel.py).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import common
import data_parallel
import evaluation_page
import generation
import journal
import model_kinds
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
        help="results JSON (default: evaluation_results.json beside the adapter, or the model folder with "
             "--no_adapter)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true", help="a prompt loop; Ctrl-D or Ctrl-C quits")
    mode.add_argument("--question",
                      help="ask one question, with --choices for options (default: none; the demo questions)")
    mode.add_argument("--evaluate", action="store_true", help="evaluate on --data_path's --split")
    mode.add_argument("--generate_traces", action="store_true",
                      help="sample --num_return_sequences reasoning traces per question of --split and append them "
                           "to --output_file (default traces.jsonl) as JSON lines; a rerun resumes")
    mode.add_argument("--report", nargs="+", metavar="NAME=FILE",
                      help="print one table from evaluation_results.json files, each row named NAME/...; no model "
                           "is loaded (default: none)")
    arg("--html", default=None, metavar="PATH",
        help="the evaluation page (evaluation_page.py): with --evaluate, where to write it (default: "
             "evaluation_report.html beside the results JSON); with --report, write one for the named runs "
             "(default: none)")
    arg("--choices", nargs="+", default=None, metavar="X:TEXT",
        help='options for --question: "A:Liver" "B:Spleen" (default: none, a free-text answer)')
    arg("--image", default=None,
        help="the figure for --question or --interactive with a vision-language model (default: none)")
    arg("--image_control", choices=["none", "blank"], default="none",
        help="with --evaluate on a vision-language model: blank = every method again with a black image of the "
             "same size in place of each figure, paired with the real one (default: %(default)s)")
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
    arg("--seed", type=int, default=42,
        help="seed of sampling (--temperature > 0): the same command writes the same traces (default: %(default)s)")
    common.add_switch(parser, "load_in_8bit", False, "load the base in 8-bit")
    common.add_switch(parser, "load_in_4bit", False, "load the base in 4-bit nf4")
    common.add_attn_implementation(parser)
    common.add_precision(parser)
    arg("--trust_remote_code", action="store_true", help="allow the model folder to run its own code")
    server = parser.add_argument_group("generation through a server (generation.py)")
    server.add_argument("--server", metavar="URL",
                        help="an OpenAI-compatible server (vLLM, SGLang, transformers serve) that generates instead of "
                             "this process; --model_name_or_path and --adapter_path then give only the tokenizer, "
                             "the prompt format and the report's names (default: none, in-process)")
    server.add_argument("--served_model", metavar="NAME",
                        help="the model name to ask for, e.g. a vLLM LoRA module (default: the one model the "
                             "server lists)")
    server.add_argument("--server_prompt", choices=["auto", "ids", "text"], default="auto",
                        help="send the kit's prompt as token ids (vLLM, SGLang) or as text without its BOS "
                             "(transformers serve); auto reads /v1/models' owned_by (default: %(default)s)")
    server.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    server.add_argument("--request_timeout", type=float, default=600.0,
                        help="seconds one request may take (default: %(default)s)")
    server.add_argument("--retries", type=int, default=4,
                        help="tries again after a connection error, timeout, 429 or 5xx, waiting 1, 2, 4 ... "
                             "seconds (default: %(default)s)")
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
    if args.html and not (args.evaluate or args.report):
        raise UsageError("--html goes with --evaluate or --report")
    if args.image_control != "none" and not args.evaluate:
        raise UsageError("--image_control goes with --evaluate")
    if args.image and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image} is not a file")
    if args.server:
        refuse_through_a_server(args)
    if data_parallel.size() > 1 and (args.server or not args.evaluate):
        raise UsageError("torchrun splits --evaluate's questions across processes (without --server, whose engine "
                         "spreads its own work); run this as one process: python inference_example.py ...")
    if args.output_file and (args.evaluate or args.generate_traces):
        common.make_output_folder(Path(args.output_file).parent, "--output_file")
    if args.html:
        common.make_output_folder(Path(args.html).parent, "--html")
    return args


def refuse_through_a_server(args):
    """What a server cannot do, refused before any request."""
    if args.evaluate and args.method != "generate":
        raise UsageError(f"--method {args.method} through --server: score and letter read log-probabilities "
                         "in-process with a shared prompt cache (servers re-read the prompt per option, or return "
                         "none); add --method generate, or drop --server")
    if args.compare_base:
        raise UsageError("--compare_base through --server: evaluate the base in a run of its own "
                         "(--served_model BASE --no_adapter), then --report both files")
    if args.concurrency < 1 or args.retries < 0 or args.request_timeout <= 0:
        raise UsageError("--concurrency must be at least 1, --retries at least 0, --request_timeout above 0")


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
    """(base model + adapter unless --no_adapter, in the precision training used on this hardware; the prompter
    that asks as training did when --data_path holds a processed dataset, else the default format)."""
    import torch

    adapter = None if args.no_adapter else Path(args.adapter_path)
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        raise UsageError(f"no LoRA adapter at {adapter} (adapter_config.json missing); train one with "
                         f"python train_sft_example.py, or pass --no_adapter for the base model")
    if (Path(args.data_path) / "preprocessing_stats.json").exists() or args.evaluate or args.generate_traces:
        prompter = model_kinds.Prompter.from_processed(args.data_path, args.model_name_or_path, args.trust_remote_code,
                                                       processing_path=adapter)  # training saved its own copy
    else:
        prompter = model_kinds.Prompter.for_model(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    refuse_before_loading(args, prompter)
    if args.server:  # no weights here: the server answers
        return generation.Server.connect(args, prompter), prompter
    # under torchrun each process holds the whole model on its own device; alone, "auto" spreads it over the GPUs
    device_map = {"": data_parallel.start()} if data_parallel.size() > 1 else \
        "auto" if torch.cuda.is_available() else None
    model = model_kinds.load_model(args.model_name_or_path, prompter.reads_images,
                                   common.pick_dtype(args.precision), args.load_in_4bit, args.load_in_8bit,
                                   device_map,
                                   common.attn_implementation(args.attn_implementation), args.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    # seeded after the load, so nothing the load does to torch's generator reaches the samples (--temperature > 0)
    torch.manual_seed(args.seed)
    return model.eval(), prompter


def refuse_before_loading(args, prompter):
    """What would fail after the minutes an 8B takes to load fails now, with its one line."""
    if args.image_control != "none" and not prompter.reads_images:
        raise UsageError("--image_control needs a vision-language model: a text model never sees the figure")
    if args.evaluate and args.method in ("letter", "all"):
        letter_token_ids(prompter)


def load_eval_questions(args):
    """Questions of the processed split (id, question, options, answer_label, figure_path)."""
    from datasets import load_from_disk

    path = Path(args.data_path)
    common.read_processed_config(path)  # its one-line error if the folder is not a complete processed dataset
    splits = load_from_disk(str(path))
    if args.split not in splits:
        raise UsageError(f"{path} has no split {args.split!r}; it has {sorted(splits)}")
    split = splits[args.split]
    if args.num_samples:
        split = split.select(range(min(args.num_samples, len(split))))
    return split.select_columns(list(common.QUESTION_COLUMNS)).to_list()


# --- The three methods ------------------------------------------------------------------------------------
def prompt_batch(prompter, batch, model, suffix=()):
    """The questions' inputs padded on the left, so the last column is every row's last token (a VLM's figures
    included), and their position ids: real tokens only, as in training."""
    features = [model_kinds.extended(prompter.question_inputs(q), list(suffix)) for q in batch]
    inputs = prompter.batch(features, side="left", device=model.device)
    positions, next_position = model_kinds.prompt_positions(model, inputs)
    return inputs, positions, next_position


def token_logprobs(logits, targets):
    """log p(target) at each position, without a float32 log-softmax over [rows, positions, vocab] at once:
    one position at a time, so the extra memory is rows x vocab."""
    import torch

    return torch.stack([torch.log_softmax(logits[:, j].float(), -1).gather(-1, targets[:, j, None])[:, 0]
                        for j in range(logits.shape[1])], dim=1)


def score_options(model, prompter, batch):
    """Per question, the summed log-probability of each option's full completion (+ eos) after the prompt.

    Shared-prompt scoring: every prompt (and a VLM's figure) runs once, left-padded and batched; its KV cache is
    then copied to one row per option and only the continuations run. The vocabulary-wide work is confined to
    continuation tokens; the prompt's forward keeps the logits of its last position alone.
    """
    import torch

    continuations = [[prompter.completion_ids(letter, q["options"]) for letter in LETTERS[:len(q["options"])]]
                     for q in batch]
    owner = torch.tensor([i for i, options in enumerate(continuations) for _ in options], device=model.device)
    rows = [ids for options in continuations for ids in options]
    inputs, positions, next_position = prompt_batch(prompter, batch, model)
    width = max(map(len, rows))
    targets = torch.full((len(rows), width), prompter.tokenizer.eos_token_id, dtype=torch.long, device=model.device)
    new_mask = torch.zeros_like(targets)
    for i, ids in enumerate(rows):  # right padding: continuation token j sits at prompt length + j
        targets[i, :len(ids)] = torch.tensor(ids)
        new_mask[i, :len(ids)] = 1
    next_positions = next_position[owner, None] + torch.arange(width, device=model.device)
    if positions.dim() == 3:  # Qwen-VL's mRoPE: a text token has equal time, height and width positions
        next_positions = next_positions.expand(3, -1, -1)
    with torch.no_grad():
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.cache
        cache.batch_select_indices(owner)
        logits = model(input_ids=targets, attention_mask=torch.cat([inputs["attention_mask"][owner], new_mask], 1),
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


def letter_token_ids(prompter):
    """(ids of the answer head, the one token id of each letter after it), or a UsageError where the
    tokenizer merges a letter with what surrounds it (then only --method score is meaningful)."""
    if not prompter.format.include_choices:
        raise UsageError("--method letter needs the options shown (preprocessed without --no_include_choices); "
                         "use --method score")
    tokenizer, head_text = prompter.tokenizer, prompter.format.answer_head()
    head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
    letters = []
    for letter in LETTERS:
        ids = tokenizer(f"{head_text} {letter}", add_special_tokens=False)["input_ids"]
        if ids[:len(head)] != head or len(ids) != len(head) + 1:
            raise UsageError(f"this tokenizer does not write ' {letter}' after {head_text!r} as one token; "
                             "use --method score")
        letters.append(ids[-1])
    return head, letters


def score_letters(model, prompter, batch):
    """MMLU-style: one forward per question over prompt + answer head ('...Answer:'), then the next-token
    log-probabilities of the option letters alone."""
    import torch

    head, letter_ids = letter_token_ids(prompter)
    inputs, positions, _ = prompt_batch(prompter, batch, model, suffix=head)
    with torch.no_grad():
        logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits
    logprobs = torch.log_softmax(logits[:, -1].float(), -1)[:, letter_ids].tolist()
    return [ranked(dict(zip(LETTERS, row[:len(question["options"])]))) for question, row in zip(batch, logprobs)]


def majority_vote(letters):
    """The most frequent parsed letter (ties: the one seen first), or None when no sample was readable."""
    votes = Counter(letter for letter in letters if letter)
    return votes.most_common(1)[0][0] if votes else None


def parsed_answer(prompt_format, question, samples):
    """A question's generated samples read: each 'answered', 'unparsed' (text after the think block that names
    no option) or 'no_answer_within_budget' (a think block the model never closed within --max_new_tokens);
    the prediction is their majority vote over parsed letters (ties: the answer seen first)."""
    for sample in samples:
        answer = prompt_format.answer_part(sample["text"])
        letter = None if answer is None else common.parse_answer_letter(answer, question["options"])
        sample.update(predicted=letter,
                      status="no_answer_within_budget" if answer is None else "answered" if letter else "unparsed")
    return {"predicted": majority_vote(s["predicted"] for s in samples),
            "samples": [{key: s[key] for key in ("text", "predicted", "status", "tokens", "finished")}
                        for s in samples]}


def answers(model, prompter, questions, method, args, streamer=None):
    """Yield (position in questions, its answer), in any order; a generated answer is None where a server
    left the question unanswered."""
    if method == "generate":  # --num_return_sequences samples a question, in-process or through --server
        for position, samples in generation.engine(model).samples(prompter, questions, args, streamer):
            yield position, samples and parsed_answer(prompter.format, questions[position], samples)
        return
    for i in range(0, len(questions), args.batch_size):
        yield from enumerate(METHODS[method](model, prompter, questions[i:i + args.batch_size]), start=i)


def generate_answers(model, prompter, batch, args, streamer=None):
    """The batch's generated answers, in its order (see answers())."""
    return [answer for _, answer in sorted(answers(model, prompter, batch, "generate", args, streamer),
                                           key=lambda pair: pair[0])]


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


def evaluate(model, prompter, questions, method, args, journal=None, run=None):
    """One method over the questions: per-question records in question order and their summary. With a journal
    (journal.py) each record is written as it comes, and the questions it already holds for this run are not
    asked again."""
    from tqdm import tqdm

    done = data_parallel.from_main(journal.done(run) if journal else {})  # the journal is the first process's
    todo = [q for q in questions if q["id"] not in done]
    mine = data_parallel.shard(todo)  # all of them in a single process
    records, new = {question_id: record for question_id, (record, _) in done.items()}, {}
    seconds, unanswered, last = 0.0, 0, time.time()
    with tqdm(total=len(mine), desc=method, unit="q", disable=None if data_parallel.is_main() else True) as bar:
        for position, answer in answers(model, prompter, mine, method, args):
            spent, last = time.time() - last, time.time()
            seconds += spent
            bar.update(1)
            if answer is None:  # a server kept failing it: never scored, never an empty answer
                unanswered += 1
                continue
            item = mine[position]
            new[item["id"]] = {"id": item["id"], "question": item["question"], "options": item["options"],
                               "figure_path": item.get("figure_path"), "gold": item["answer_label"],
                               "predicted": answer["predicted"], "correct": answer["predicted"] == item["answer_label"],
                               "option_scores": answer.get("option_scores"), "samples": answer.get("samples")}
            if journal:
                journal.write(run, new[item["id"]], spent)
    shares = data_parallel.gather((new, seconds))  # every process's records, so each holds the whole row
    for process, (answered, _) in enumerate(shares):
        records.update(answered)
        if journal and process:
            for record in answered.values():
                journal.write(run, record, 0.0)  # the first process's own seconds already are the wall time
    # wall time: the processes answered side by side
    seconds = sum(spent for _, spent in done.values()) + max(spent for _, spent in shares)
    if unanswered:
        kept = f"; the {len(records)} answered are kept in {journal.path}" if journal else ""
        raise common.Unfinished(f"{unanswered} of {len(questions)} questions got no answer{kept}: run the same "
                                "command again to ask only for the others")
    ordered = [records[q["id"]] for q in questions]
    return {**summarize(ordered, seconds), "answered_per_process": [len(answered) for answered, _ in shares],
            "records": ordered}


def paired_comparison(first, second, resamples=10_000, seed=0):
    """first minus second accuracy on the same questions (fine-tuned vs base, a figure vs a blank one): a paired
    bootstrap 95% interval and the exact McNemar p-value (two-sided binomial test on the discordant pairs)."""
    import numpy as np

    second_right = {r["id"]: r["correct"] for r in second["records"]}
    diff = np.array([int(r["correct"]) - int(second_right[r["id"]]) for r in first["records"]])
    only_first, only_second = int((diff == 1).sum()), int((diff == -1).sum())
    means = np.random.default_rng(seed).choice(diff, size=(resamples, len(diff))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, i) for i in range(min(only_first, only_second) + 1)) / 2 ** discordant
    return {"n": len(diff), "accuracy_difference": float(diff.mean()), "bootstrap_ci95": [float(low), float(high)],
            "only_first_correct": only_first, "only_second_correct": only_second,
            "mcnemar_exact_p": min(1.0, 2 * tail)}


def agreement(results):
    """Share of questions on which two methods predict the same letter, for every pair of methods run."""
    predictions = {name: [r["predicted"] for r in result["records"]] for name, result in results.items()}
    return {a: {b: sum(x == y for x, y in zip(predictions[a], predictions[b])) / len(predictions[a])
                for b in predictions} for a in predictions}


def evaluate_all(model, prompter, questions, args, journal=None):
    """Every model (fine-tuned, base) x figure (real, blank) x method asked; the pairs that answer a question:
    what fine-tuning added, and what the figure adds."""
    methods = {"both": ["score", "generate"], "all": ["score", "letter", "generate"]}.get(args.method, [args.method])
    models = {"base" if args.no_adapter else "fine_tuned": contextlib.nullcontext}
    if args.compare_base:
        models["base"] = model.disable_adapter  # the same weights with LoRA switched off: no second load
    figures = {"": None, "blank_image/": "blank"} if args.image_control == "blank" else {"": None}
    results, pairs = {}, []
    for name, context in models.items():
        with context():
            for figure, control in figures.items():
                asked = prompter.replaced(image_control=control)
                for method in methods:
                    run = f"{name}/{figure}{method}"
                    results[run] = evaluate(model, asked, questions, method, args, journal, run)
                    if figure:
                        pairs.append((f"{name}/{method}", f"{name}/{figure}{method}"))
    if args.compare_base:
        pairs += [(f"fine_tuned/{method}", f"base/{method}") for method in methods]
    report = {"results": results,
              "paired": {f"{a} - {b}": paired_comparison(results[a], results[b]) for a, b in pairs}}
    if len(methods) > 1:
        report["agreement"] = {name: agreement({m: results[f"{name}/{m}"] for m in methods}) for name in models}
    return report


def combined_report(named_files):
    """--report NAME=FILE ...: the results of several evaluation_results.json as one report, rows and pairs
    named NAME/...; the first row of each later file is also paired with the first file's first row when both
    answered the same questions (a VLM against a text-only model on the same held-out set)."""
    report, firsts = {"results": {}, "paired": {}, "runs": {}}, []
    for item in named_files:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise UsageError(f"--report takes NAME=FILE with an evaluation_results.json, got {item!r}")
        loaded = json.loads(Path(path).read_text())
        # where each run's figures and training curves are, for the page
        report["runs"][name] = {"file": path, **{key: loaded.get(key) for key in
                                                 ("model_name_or_path", "adapter_path", "data_path", "split",
                                                  "reads_images")}}
        report["results"].update({f"{name}/{row}": r for row, r in loaded["results"].items()})
        report["paired"].update({" - ".join(f"{name}/{side}" for side in pair.split(" - ")): p
                                 for pair, p in loaded.get("paired", {}).items()})
        firsts.append(f"{name}/{next(iter(loaded['results']))}")
    first = report["results"][firsts[0]]
    for other in firsts[1:]:
        if {r["id"] for r in report["results"][other]["records"]} == {r["id"] for r in first["records"]}:
            report["paired"][f"{firsts[0]} - {other}"] = paired_comparison(first, report["results"][other])
    return report


def print_report(report):
    """The summary as evaluation_page.report_text formats it (the page shows the same cells), in columns."""
    text = evaluation_page.report_text(report)
    widths = [max(map(len, report["results"])) + 2, *(width for _, width in evaluation_page.SUMMARY_COLUMNS)]
    for row in [text["header"], *text["rows"]]:
        print(row[0].ljust(widths[0]) + "".join(cell.rjust(width) for cell, width in zip(row[1:], widths[1:])))
    for _, line in text["lines"]:
        print(line)


def evaluation_output(args):
    """Where --evaluate writes its report: --output_file, else beside the adapter (or a local --no_adapter model)."""
    beside = Path(args.model_name_or_path if args.no_adapter else args.adapter_path)
    return Path(args.output_file or (beside if beside.is_dir() else Path(".")) / "evaluation_results.json")


def save_evaluation(report, model, prompter, args, output):
    """evaluation_results.json and evaluation_report.html beside it (or at --html)."""
    report = {"model_name_or_path": args.model_name_or_path,
              "adapter_path": None if args.no_adapter else args.adapter_path, "data_path": args.data_path,
              "split": args.split, "prompt_format": prompter.format.as_config(),
              "reads_images": prompter.reads_images, "processes": data_parallel.size(),
              **generation.engine(model).describe(), **report}
    common.write_json_atomic(output, report)
    print(f"wrote {output}")
    print(f"wrote {evaluation_page.write_page(report, args.html or output.with_name('evaluation_report.html'))}")


# --- Modes ------------------------------------------------------------------------------------------------
def answer_and_show(model, prompter, question, args):
    """Stream the model's answer to one question (a dict: question, options, and image or figure_path)."""
    from transformers import TextStreamer

    print(f"\nQ: {question['question']}")
    for letter, text in zip(LETTERS, question["options"]):
        print(f"   {letter}: {text}")
    if prompter.reads_images:
        print(f"   [figure: {question.get('figure_path') or args.image}]")
    print("model: ", end="", flush=True)
    streamer = TextStreamer(prompter.tokenizer, skip_prompt=True, skip_special_tokens=True)
    [answer] = generate_answers(model, prompter, [question], args, streamer)
    if answer is None:
        raise common.Unfinished("the server left the question unanswered; ask again")
    gold = f" (gold {question['answer_label']})" if "answer_label" in question else ""
    print(f"-> parsed answer: {answer['predicted'] or answer['samples'][0]['status']}{gold}")


def figure_from(path, prompter):
    """The image a user named with --image (or typed), as the model will see it; None for a text model."""
    if not prompter.reads_images:
        return None
    if not path:
        raise UsageError("this model reads the figure: pass --image PATH")
    image, why = model_kinds.open_image(path)
    if image is None:
        raise UsageError(f"--image {path}: {why.replace('_', ' ')}")
    return image


def demo_questions(args, prompter):
    """Three questions to show: the built-in text ones, or for a model that reads figures the first three of
    --data_path's test split (a figure is needed, and the processed data has them)."""
    if not prompter.reads_images:
        return [{"question": question, "options": options} for question, options in DEMO_QUESTIONS]
    if not (Path(args.data_path) / "dataset_dict.json").exists():
        raise UsageError("a vision-language model needs a figure: pass --question with --image, or --data_path "
                         "with a processed dataset to show its first test questions")
    return load_eval_questions(argparse.Namespace(**{**vars(args), "num_samples": 3}))


def interactive(model, prompter, args):
    """A REPL over plain text: nothing typed is ever evaluated or executed."""
    figure = "an image path (empty: the last one), then " if prompter.reads_images else ""
    print(f"Type {figure}a question, then its options one per line as 'A: text' and an empty line. Ctrl-D quits.")
    image_path = args.image
    while True:
        try:
            if prompter.reads_images:
                image_path = input("\nimage> ").strip() or image_path
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
        try:
            image = figure_from(image_path, prompter)
        except UsageError as err:
            print(f"error: {err}")
            continue
        answer_and_show(model, prompter, {"question": question, "options": options, "image": image}, args)


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


def generate_traces(model, prompter, questions, args):
    """Append k sampled traces per question to the traces file, one JSON line each, flushed per question."""
    from tqdm import tqdm

    path = Path(args.output_file or "traces.jsonl")
    done = resume_traces(path, args.num_return_sequences)
    questions = [q for q in questions if q["id"] not in done]
    solved, written, unanswered, start = 0, 0, 0, time.time()
    print(f"{len(done)} questions already in {path}; generating for {len(questions)}")
    with open(path, "a", encoding="utf-8") as out, tqdm(total=len(questions), unit="q", disable=None) as bar:
        for position, answer in answers(model, prompter, questions, "generate", args):
            question = questions[position]
            bar.update(1)
            if answer is None:  # a server kept failing it: nothing written, so a rerun asks for it again
                unanswered += 1
                continue
            for index, sample in enumerate(answer["samples"]):
                reasoning, answer_text = prompter.format.split_reasoning(sample["text"])
                out.write(json.dumps({"id": question["id"], "sample": index, "reasoning": reasoning,
                                      "answer": answer_text, "predicted": sample["predicted"],
                                      "gold": question["answer_label"],
                                      "correct": sample["predicted"] == question["answer_label"],
                                      "tokens": sample["tokens"], "finished": sample["finished"]},
                                     ensure_ascii=False) + "\n")
            out.flush()
            solved += any(s["predicted"] == question["answer_label"] for s in answer["samples"])
            written += 1
            bar.set_postfix(with_correct_trace=f"{solved / written:.0%}")
    seconds = time.time() - start
    print(f"{solved} of {written} new questions have a correct trace; "
          f"{len(questions) / seconds if seconds else 0:.2f} questions/s; wrote {path}")
    if unanswered:
        raise common.Unfinished(f"{unanswered} of {len(questions)} questions got no answer and are not in {path}: "
                                "run the same command again to ask only for them")
    print(f"next: python preprocess_pmc_vqa_for_sft.py --reasoning_traces {path} ...")


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        report = combined_report(args.report)
        print_report(report)
        if args.html:
            print(f"wrote {evaluation_page.write_page(report, args.html)}")
        return
    options = parse_choices(args.choices) if args.question and args.choices else None
    # read before the model: a wrong --data_path or --split fails in a second, not after an 8B's load
    questions = load_eval_questions(args) if args.evaluate or args.generate_traces else None
    model, prompter = load_model(args)

    if args.evaluate:
        output = evaluation_output(args)
        # resumable; under torchrun the first process keeps it (data_parallel.py)
        records = journal.Journal(output.with_suffix(".partial.jsonl"), journal.fingerprint(args)) \
            if data_parallel.is_main() else None
        report = evaluate_all(model, prompter, questions, args, records)
        if data_parallel.is_main():
            print_report(report)
            save_evaluation(report, model, prompter, args, output)
            records.remove()
        data_parallel.finish()
    elif args.generate_traces:
        generate_traces(model, prompter, questions, args)
    elif args.interactive:
        interactive(model, prompter, args)
    elif args.question:
        # shown to the model only if training showed options too; the parser matches its answer either way
        shown = prompter.replaced(format=dataclasses.replace(
            prompter.format, include_choices=prompter.format.include_choices and bool(options)))
        question = {"question": args.question, "options": options or [], "image": figure_from(args.image, prompter)}
        answer_and_show(model, shown, question, args)
    else:
        for question in demo_questions(args, prompter):
            answer_and_show(model, prompter, question, args)


if __name__ == "__main__":
    common.run_main(main)
