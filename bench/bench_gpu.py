"""Measure the 8B recipe on one GPU without downloading the 8B: `make gpu-check`.

    python bench/bench_gpu.py                                  # one CUDA GPU, the 8B's geometry (~8 minutes)
    python bench/bench_gpu.py --configs lora packing score     # a subset
    python bench/bench_gpu.py --shape tiny                     # the same code on the demo model, CPU, < 1 minute

A randomly initialised LlamaForCausalLM with DeepSeek-R1-Distill-Llama-8B's exact geometry (its config.json:
hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256, RoPE theta 500000 with
llama3 scaling) is saved once in bf16 and then driven through the training script's own functions
(setup_model_and_tokenizer, build_trainer: the collator and the Trainer) and the inference script's
evaluate(). Speed and memory do not depend on the weights' values.

Training rows: token lengths are drawn from --lengths_from (a processed dataset: use your real
preprocessing output for real lengths), else from the ASSUMED prompt and completion ranges below, which
follow the issue's estimate for PMC-VQA under the R1 tokenizer (prompts ~150-250 tokens). Each training
configuration runs --warmup_steps, then --steps timed steps; an out-of-memory becomes a table entry.
Evaluation uses the demo's test questions rendered with the demo tokenizer (shorter prompts than R1's).
Writes the table as JSON to bench/results/gpu_<shape>.json.
"""
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402

R1_8B_GEOMETRY = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
ASSUMED_PROMPT_TOKENS, ASSUMED_COMPLETION_TOKENS = (120, 260), (10, 24)
V1_TRAIN_ROWS = 176_948
TRAINING = {"lora": [], "packing": ["--packing"], "checkpointing": ["--gradient_checkpointing"],
            "liger": ["--use_liger_kernel"], "8bit": ["--load_in_8bit"], "4bit": ["--load_in_4bit"]}
EVALUATION = {"score": ("score", 1), "letter": ("letter", 1), "generate32": ("generate", 32),
              "generate512": ("generate", 512)}
NEEDS = {"liger": "liger_kernel", "8bit": "bitsandbytes", "4bit": "bitsandbytes"}


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--shape", choices=["r1-8b", "tiny"], default="r1-8b", help="model (default: %(default)s)")
    parser.add_argument("--configs", nargs="+", choices=[*TRAINING, *EVALUATION], default=[*TRAINING, *EVALUATION],
                        help="what to measure (default: all)")
    parser.add_argument("--batch_size", type=int, default=None, help="training rows per step (default: 8; tiny 4)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default: 2; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: 8; tiny 2)")
    parser.add_argument("--eval_questions", type=int, default=None, help="questions per method (default: 64; tiny 4)")
    parser.add_argument("--lengths_from", default=None,
                        help="a processed dataset whose train rows give the token lengths (default: the assumed "
                             "ranges in this docstring)")
    return parser


def model_folder(shape):
    """A model folder the scripts load like any other: the demo model, or random weights of the 8B's shape."""
    _, tiny = bda.build_all(bda.DEMO_DIR)
    if shape == "tiny":
        return tiny
    folder = ROOT / "bench" / "results" / "r1-8b-random"
    if not (folder / "model.safetensors.index.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tiny)  # R1's special tokens; its ids are valid in 128k
        config = LlamaConfig(**R1_8B_GEOMETRY, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            model = LlamaForCausalLM(config)
            torch.set_default_dtype(torch.float32)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    return folder


def training_rows(count, lengths_from, vocab_size, seed=0):
    """Synthetic rows (random ids) whose prompt/completion lengths follow the chosen distribution."""
    from datasets import Dataset, load_from_disk

    rng = random.Random(seed)
    if lengths_from:
        train = load_from_disk(str(lengths_from))["train"]
        lengths = [(labels.count(-100), len(labels) - labels.count(-100)) for labels in train["labels"][:5000]]
    else:
        lengths = [(rng.randint(*ASSUMED_PROMPT_TOKENS), rng.randint(*ASSUMED_COMPLETION_TOKENS)) for _ in range(5000)]
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(count):
        prompt, completion = rng.choice(lengths)
        ids = [rng.randrange(10, vocab_size) for _ in range(prompt + completion)]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(rows), sum(p + c for p, c in lengths) / len(lengths)


def measure_training(name, folder, args):
    import torch
    from transformers import TrainerCallback

    import train_sft_example as train

    steps = args.warmup_steps + args.steps
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    rows, mean_tokens = training_rows(steps * args.batch_size, args.lengths_from, vocab_size)
    flags = ["--model_name_or_path", str(folder), "--data_path", str(ROOT / "bench" / "results"), "--output_dir",
             str(ROOT / "bench" / "results" / "gpu_trainer"), "--batch_size", str(args.batch_size), "--grad_accum",
             "1", "--eval_accuracy_samples", "0", *TRAINING[name]]
    run_args = train.parse_args(flags)
    dtype, precision = train.pick_precision()
    model, tokenizer = train.setup_model_and_tokenizer(run_args, dtype)
    trainer = train.build_trainer(run_args, model, tokenizer, rows, rows, precision)
    for key, value in {"max_steps": steps, "eval_strategy": "no", "save_strategy": "no",
                       "load_best_model_at_end": False, "logging_steps": steps}.items():
        setattr(trainer.args, key, value)

    class Clock(TrainerCallback):  # times the steps after warm-up
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start, self.tokens = time.time(), state.num_input_tokens_seen

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tokens_per_second = (trainer.state.num_input_tokens_seen - clock.tokens) / (time.time() - clock.start)
    return {"tokens_per_second": round(tokens_per_second),
            "hours_per_v1_epoch": round(V1_TRAIN_ROWS * mean_tokens / tokens_per_second / 3600, 2)}


def measure_evaluation(name, folder, args):
    import inference_example as inference

    method, budget = EVALUATION[name]
    processed = bda.processed_demo_data(bda.demo_model("tiny"), ROOT / "bench" / "results" / "gpu_eval_data")
    run_args = inference.parse_args(["--model_name_or_path", str(folder), "--no_adapter", "--data_path",
                                     str(processed), "--num_samples", str(args.eval_questions), "--max_new_tokens",
                                     str(budget)])
    model, tokenizer = inference.load_model(run_args)
    if method == "generate":  # a random model never stops by itself: every question uses the whole budget
        model.generation_config.eos_token_id = None
    prompt_format = common.PromptFormat.from_processed(processed, tokenizer)
    result = inference.evaluate(model, tokenizer, inference.load_eval_questions(run_args), prompt_format, method,
                                run_args)
    return {"questions_per_second": round(result["questions_per_second"], 2)}


def measure(name, folder, args):
    """One table row; a missing package or an out-of-memory is an entry, never a crash or a made-up number."""
    import importlib.util

    import torch

    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        return {"status": f"not available (no {NEEDS[name]})"}
    if name == "liger" and not torch.cuda.is_available():
        return {"status": "not available (needs CUDA)"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        row = (measure_training if name in TRAINING else measure_evaluation)(name, folder, args)
    except torch.cuda.OutOfMemoryError:
        return {"status": "out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"status": "ok", **row, "peak_gpu_memory_gb": round(peak, 1) if peak else None}


SIZES = {"r1-8b": {"batch_size": 8, "warmup_steps": 2, "steps": 8, "eval_questions": 64},
         "tiny": {"batch_size": 4, "warmup_steps": 1, "steps": 2, "eval_questions": 4}}  # tiny: a wiring check


def main(argv=None):
    args = make_parser().parse_args(argv)
    for key, value in SIZES[args.shape].items():
        setattr(args, key, getattr(args, key) or value)
    import torch

    if args.shape == "r1-8b" and not torch.cuda.is_available():
        raise common.UsageError("--shape r1-8b needs a CUDA GPU; use --shape tiny on a CPU")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    folder = model_folder(args.shape)
    rows = {}
    for name in args.configs:
        rows[name] = measure(name, folder, args)
        print(f"{name}: {rows[name]}", flush=True)
    print(f"\n{args.shape} on {device}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup_steps}")
    print(f"{'config':16}{'status':28}{'tokens/s':>10}{'h/epoch v1':>12}{'questions/s':>13}{'peak GB':>9}")
    for name, row in rows.items():
        print(f"{name:16}{row['status']:28}{row.get('tokens_per_second', ''):>10}"
              f"{row.get('hours_per_v1_epoch', ''):>12}{row.get('questions_per_second', ''):>13}"
              f"{row.get('peak_gpu_memory_gb') or '':>9}")
    output = ROOT / "bench" / "results" / f"gpu_{args.shape}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    common.write_json_atomic(output, {"shape": args.shape, "device": device, "date": time.strftime("%Y-%m-%d"),
                                      "command": " ".join(sys.argv), "rows": rows})
    print(f"wrote {output}")


if __name__ == "__main__":
    common.run_main(main)
