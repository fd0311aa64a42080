"""What the CPU training benchmarks share (bench_padding.py, bench_precision.py): their flags, and a LoRA
Trainer built by train_sft_example's own functions on the demo rows, set to train only (no evaluation, no
checkpoints), so that the clock measures training and nothing else."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model_kinds  # noqa: E402
import train_sft_example as train  # noqa: E402


def add_flags(parser, steps):
    parser.add_argument("--model", choices=["tiny", "real"], default="tiny", help="which model (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=steps, help="training steps per run (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step (default: %(default)s)")


def training_only_trainer(model_dir, processed, name, steps, batch_size, flags=()):
    """(trainer, prompter) for steps x batch_size rows of processed; flags are train_sft_example.py's."""
    args = train.parse_args(["--data_path", str(processed), "--model_name_or_path", str(model_dir), "--output_dir",
                             str(ROOT / "bench" / "results" / name), "--batch_size", str(batch_size),
                             "--grad_accum", "1", "--eval_accuracy_samples", "0", *flags])
    prompter = model_kinds.Prompter.from_processed(processed, model_dir)
    rows, validation, _ = train.load_processed_dataset(processed, steps * batch_size, 0, prompter.training_columns)
    dtype, precision = train.pick_precision(args.precision)
    model = train.setup_model(args, dtype, vlm=False)
    trainer = train.build_trainer(args, model, prompter, rows, validation, train.training_arguments(args, precision))
    for key, value in {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}.items():
        setattr(trainer.args, key, value)
    return trainer, prompter
