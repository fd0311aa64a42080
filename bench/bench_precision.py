"""Training and scoring speed by --precision on this machine's CPU, side by side in one run.

    python bench/bench_precision.py                      # the tiny model
    python bench/bench_precision.py --model real         # SmolLM2-135M-Instruct (make real-model)

Each precision trains --steps LoRA steps through the script's own Trainer on the same rows in the same order,
then scores the same validation questions (option scoring). bf16 is the base loaded in bfloat16 with bf16 mixed
precision, as on a GPU. It pays where the CPU multiplies bf16 natively (AVX-512 BF16, AMX; `lscpu | grep -o
'avx512_bf16\\|amx'` says), and costs elsewhere. The first step's loss is the same forward pass at both
precisions, so it should agree to bf16's rounding; the mean loss over the steps shows whether bf16 also learns
as fast per step (one cause if not: the adapter's output is added to bf16 activations, where a small
update rounds away).
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402
import inference_example as inference  # noqa: E402
from bench.cpu_training import add_flags, training_only_trainer  # noqa: E402


def measure(precision, processed, model_dir, steps, batch_size):
    """(train seconds, first step's loss, mean loss, scored questions/s) at one precision."""
    trainer, prompter = training_only_trainer(model_dir, processed, "precision", steps, batch_size,
                                              ["--logging_steps", "1", "--precision", precision])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    questions = inference.load_eval_questions(inference.parse_args(
        ["--data_path", str(processed), "--split", "validation", "--num_samples", "32"]))
    model = trainer.model.eval()
    start = time.time()
    for i in range(0, len(questions), 8):
        inference.score_options(model, prompter, questions[i:i + 8])
    return seconds, losses[0], sum(losses) / len(losses), len(questions) / (time.time() - start)


def main():
    parser = common.make_parser(__doc__)
    add_flags(parser, steps=8)
    args = parser.parse_args()
    model_dir = bda.demo_model(args.model)
    processed = bda.processed_demo_data(model_dir, ROOT / "bench" / "results" / f"precision_data_{args.model}",
                                        "--no_include_choices")
    results = {p: measure(p, processed, model_dir, args.steps, args.batch_size) for p in ("fp32", "bf16")}
    print(f"model {args.model} ({model_dir.name}), {args.steps} steps x {args.batch_size} rows, CPU")
    print(f"{'precision':10}{'train s':>9}{'vs fp32':>9}{'first loss':>12}{'mean loss':>11}{'scored q/s':>12}"
          f"{'vs fp32':>9}")
    (fp32_seconds, _, _, fp32_rate) = results["fp32"]
    for name, (seconds, first, mean, rate) in results.items():
        print(f"{name:10}{seconds:>9.1f}{fp32_seconds / seconds:>8.2f}x{first:>12.4f}{mean:>11.4f}{rate:>12.2f}"
              f"{rate / fp32_rate:>8.2f}x")


if __name__ == "__main__":
    main()
