"""Evaluation throughput, side by side in one run: option scoring the naive way (every question's prompt fed
once per option, a float32 log-softmax over [rows, positions, vocab]) vs shared-prompt scoring, the letter
scorer, and batched generation.

    python bench/bench_inference.py                    # the tiny demo model, 96 test questions
    python bench/bench_inference.py --model real       # SmolLM2-135M-Instruct (make real-model), 49k vocab

The base model is measured (no adapter): speed does not depend on what LoRA learned. score_options_naive is
also the reference that tests/test_inference.py holds the shared-prompt scorer to (1e-4).
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402
import inference_example as inference  # noqa: E402
import model_kinds  # noqa: E402
from common import LETTERS  # noqa: E402


def score_options_naive(model, prompter, batch):
    """The scorer before shared prompts: prompt (and figure) + option as one full row per option, right-padded."""
    import torch

    rows, spans = [], []
    for item in batch:
        prompt = prompter.question_inputs(item)
        start = prompt["input_ids"].shape[-1]
        for letter in LETTERS[:len(item["options"])]:
            ids = prompter.completion_ids(letter, item["options"])
            rows.append(model_kinds.extended(prompt, ids))
            spans.append((start, start + len(ids)))
    inputs = prompter.batch(rows, side="right", device=model.device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits.float(), -1)
    input_ids = inputs["input_ids"]
    scores = [logprobs[i, start - 1:end - 1].gather(-1, input_ids[i, start:end, None]).sum().item()
              for i, (start, end) in enumerate(spans)]
    outputs, k = [], 0
    for item in batch:
        outputs.append(inference.ranked(dict(zip(LETTERS, scores[k:k + len(item["options"])]))))
        k += len(item["options"])
    return outputs


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", choices=["tiny", "real"], default="tiny", help="which model (default: %(default)s)")
    parser.add_argument("--num_samples", type=int, default=96, help="questions (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="questions per batch (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generation budget (default: %(default)s)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    model_dir = bda.demo_model(args.model)
    processed = bda.processed_demo_data(model_dir, ROOT / "bench" / "results" / f"inference_data_{args.model}")
    run_args = inference.parse_args(["--model_name_or_path", str(model_dir), "--no_adapter", "--data_path",
                                     str(processed), "--num_samples", str(args.num_samples), "--batch_size",
                                     str(args.batch_size), "--max_new_tokens", str(args.max_new_tokens)])
    model, prompter = inference.load_model(run_args)
    questions = inference.load_eval_questions(run_args)
    inference.METHODS["score (naive)"] = score_options_naive  # the old scorer, run by the same loop
    runs = {}
    for method in ("score (naive)", "score", "letter", "generate"):
        start = time.time()
        result = inference.evaluate(model, prompter, questions, method, run_args)
        runs[method] = (len(questions) / (time.time() - start), result["accuracy"])
    naive = runs["score (naive)"][0]
    print(f"model {args.model} ({model_dir.name}, vocab {len(prompter.tokenizer):,}), {len(questions)} questions, "
          f"batch {args.batch_size}, generate budget {args.max_new_tokens} tokens")
    print(f"{'method':22}{'questions/s':>13}{'vs naive score':>16}{'accuracy':>10}")
    for name, (rate, accuracy) in runs.items():
        print(f"{name:22}{rate:>13.2f}{rate / naive:>15.2f}x{accuracy:>10.3f}")


if __name__ == "__main__":
    main()
