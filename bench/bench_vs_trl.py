"""Our training path vs TRL's SFTTrainer on the same rows, model, LoRA settings, steps and learning rate.

    pip install -r bench/requirements-bench.txt      # TRL, for this benchmark only
    python bench/bench_vs_trl.py                     # the real model (SmolLM2-135M-Instruct), 20 steps of 8 rows
    python bench/bench_vs_trl.py --model tiny

Both train on the rows preprocess_pmc_vqa_for_sft.py wrote (input_ids, labels -100 on the prompt: TRL takes
pre-tokenized rows with labels as they are, so both optimise the same completion-only loss). Each run is a
separate process (so peak RSS is its own) that builds the same LoRA model through train_sft_example's
setup_model, trains, then reports tokens/s and the validation loss on the same rows.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402
import model_kinds  # noqa: E402

RUNS = {"ours, dynamic padding": "ours", "ours, --packing": "ours_packing",
        "ours, --gradient_checkpointing": "ours_checkpointing",
        "TRL SFTTrainer, padded": "trl", "TRL SFTTrainer, padding_free": "trl_padding_free"}


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", choices=["tiny", "real"], default="real", help="which model (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step (default: %(default)s)")
    # one measurement, in a child process that main() starts
    parser.add_argument("--run", choices=list(RUNS.values()), default=None, help=argparse.SUPPRESS)
    return parser


def one_run(run, model_dir, processed, args):
    import resource

    import torch

    import train_sft_example as train

    flags = ["--model_name_or_path", str(model_dir), "--data_path", str(processed), "--output_dir",
             str(ROOT / "bench" / "results" / f"vs_trl_{run}"), "--batch_size", str(args.batch_size), "--grad_accum",
             "1", "--learning_rate", "2e-4", "--eval_accuracy_samples", "0", "--seed", "0"]
    extra = {"ours_packing": ["--packing"], "ours_checkpointing": ["--gradient_checkpointing"]}.get(run, [])
    run_args = train.parse_args(flags + extra)
    prompter = model_kinds.Prompter.from_processed(processed, model_dir)
    train_rows, validation, _ = train.load_processed_dataset(processed, args.steps * args.batch_size, 0,
                                                             prompter.training_columns)
    validation = validation.select(range(min(64, len(validation))))
    torch.manual_seed(0)
    model = train.setup_model(run_args, torch.float32, vlm=False)
    if run.startswith("ours"):
        trainer = train.build_trainer(run_args, model, prompter, train_rows, validation,
                                      train.training_arguments(run_args, {"use_cpu": True}))
        for key, value in {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}.items():
            setattr(trainer.args, key, value)
    else:
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(output_dir=run_args.output_dir, per_device_train_batch_size=args.batch_size,
                           per_device_eval_batch_size=args.batch_size, learning_rate=2e-4, lr_scheduler_type="cosine",
                           warmup_steps=0.03, num_train_epochs=1, seed=0, data_seed=0, save_strategy="no",
                           eval_strategy="no", report_to="none", use_cpu=True, max_length=None,
                           padding_free=run == "trl_padding_free", include_num_input_tokens_seen="non_padding",
                           disable_tqdm=True, dataset_num_proc=1,
                           # TRL 1.x turns both on by default (Trainer does not): off, so both sides run the
                           # same fp32 computation with activations kept (ours_checkpointing shows what the
                           # default would save)
                           gradient_checkpointing=False, bf16=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=train_rows, eval_dataset=validation,
                             processing_class=prompter.tokenizer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    real_tokens = sum(len(ids) for ids in train_rows["input_ids"])
    return {"tokens_per_second": real_tokens / seconds, "seconds": seconds, "steps": trainer.state.global_step,
            "eval_loss": trainer.evaluate()["eval_loss"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None):
    args = make_parser().parse_args(argv)
    model_dir = bda.demo_model(args.model)
    processed = bda.processed_demo_data(model_dir, ROOT / "bench" / "results" / f"vs_trl_data_{args.model}",
                                        "--sample_size", max(args.steps * args.batch_size, 64))
    if args.run:
        print(json.dumps(one_run(args.run, model_dir, processed, args)))
        return
    results = {}
    for name, run in RUNS.items():
        child = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                "--batch_size", str(args.batch_size), "--run", run], capture_output=True, text=True,
                               cwd=ROOT)
        if child.returncode:
            raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    ours = results["ours, dynamic padding"]["tokens_per_second"]
    print(f"model {args.model} ({model_dir.name}), {args.steps} steps x {args.batch_size} rows, LoRA r16 all-linear, "
          "lr 2e-4, CPU fp32")
    print(f"{'run':32}{'real tokens/s':>15}{'vs ours':>9}{'peak RSS GB':>13}{'val loss':>10}{'steps':>7}")
    for name, r in results.items():
        print(f"{name:32}{r['tokens_per_second']:>15,.0f}{r['tokens_per_second'] / ours:>8.2f}x"
              f"{r['peak_rss_gb']:>13.2f}{r['eval_loss']:>10.4f}{r['steps']:>7}")


if __name__ == "__main__":
    main()
