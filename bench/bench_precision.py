"""Training and scoring speed by --precision on this machine's CPU, side by side in one run.

    python bench/bench_precision.py                      # the tiny model
    python bench/bench_precision.py --model real         # SmolLM2-135M-Instruct (make real-model)

Each precision trains --steps LoRA steps through the script's own Trainer on the same rows, then scores the
same validation questions (option scoring). bf16 is the base loaded in bfloat16 with bf16 mixed precision, as
on a GPU. It pays where the CPU multiplies bf16 natively (AVX-512 BF16, AMX; `lscpu | grep -o 'avx512_bf16\\|amx'`
says), and costs elsewhere; the same final loss within bf16's rounding says nothing was lost in the trade.
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
import train_sft_example as train  # noqa: E402


def measure(precision, processed, model_dir, steps, batch_size):
    """(train seconds, final train loss, scored questions/s) at one precision."""
    args = train.parse_args(["--data_path", str(processed), "--model_name_or_path", str(model_dir), "--output_dir",
                             str(ROOT / "bench" / "results" / "precision"), "--batch_size", str(batch_size),
                             "--grad_accum", "1", "--eval_accuracy_samples", "0", "--logging_steps", "1",
                             "--precision", precision])
    prompter = model_kinds.Prompter.from_processed(processed, model_dir)
    rows, validation, _ = train.load_processed_dataset(processed, steps * batch_size, 0, prompter.training_columns)
    dtype, mixed = train.pick_precision(precision)
    model = train.setup_model(args, dtype, vlm=False)
    trainer = train.build_trainer(args, model, prompter, rows, validation, mixed)
    trainer.args.eval_strategy = trainer.args.save_strategy = "no"
    trainer.args.load_best_model_at_end = False
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    loss = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]
    questions = inference.load_eval_questions(inference.parse_args(
        ["--data_path", str(processed), "--split", "validation", "--num_samples", "32"]))
    model.eval()
    start = time.time()
    for i in range(0, len(questions), 8):
        inference.score_options(model, prompter, questions[i:i + 8])
    return seconds, loss, len(questions) / (time.time() - start)


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", choices=["tiny", "real"], default="tiny", help="which model (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per precision (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step (default: %(default)s)")
    args = parser.parse_args()
    model_dir = bda.demo_model(args.model)
    processed = bda.processed_demo_data(model_dir, ROOT / "bench" / "results" / f"precision_data_{args.model}",
                                        "--no_include_choices")
    results = {p: measure(p, processed, model_dir, args.steps, args.batch_size) for p in ("fp32", "bf16")}
    print(f"model {args.model} ({model_dir.name}), {args.steps} steps x {args.batch_size} rows, CPU")
    print(f"{'precision':10}{'train s':>9}{'vs fp32':>9}{'last loss':>11}{'scored q/s':>12}{'vs fp32':>9}")
    (fp32_seconds, _, fp32_rate) = results["fp32"]
    for name, (seconds, loss, rate) in results.items():
        print(f"{name:10}{seconds:>9.1f}{fp32_seconds / seconds:>8.2f}x{loss:>11.4f}{rate:>12.2f}"
              f"{rate / fp32_rate:>8.2f}x")


if __name__ == "__main__":
    main()
