"""Training throughput by batching strategy, side by side in one run.

    python bench/bench_padding.py                            # the tiny model, 30 steps each of batch 8
    python bench/bench_padding.py --model real --steps 8     # SmolLM2-135M-Instruct (make real-model)

Strategies: pad every row to max_length 2048 (the naive way), dynamic padding (the default),
--group_by_length, and --packing (padding-free). Reports real (non-pad) tokens/s and the share of
real tokens among all token positions the model computed. On CPU packing has no variable-length
attention kernel, so its tokens/s here says little about a GPU with flash-attention.
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402
from bench.cpu_training import add_flags, training_only_trainer  # noqa: E402


def measure(strategy, processed, model_dir, steps, batch_size):
    from transformers import DataCollatorForSeq2Seq

    flags = {"packing": ["--packing"], "group_by_length": ["--group_by_length"]}.get(strategy, [])
    trainer, prompter = training_only_trainer(model_dir, processed, "padding", steps, batch_size,
                                              ["--precision", "fp32", *flags])
    if strategy == "pad_to_2048":
        trainer.data_collator = DataCollatorForSeq2Seq(prompter.tokenizer, padding="max_length", max_length=2048,
                                                       label_pad_token_id=-100)
    real = computed = 0
    for batch in trainer.get_train_dataloader():
        mask = batch.get("attention_mask")  # packed batches have none: every position is a real token
        real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        computed += batch["input_ids"].numel()
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    return real / seconds, real / computed, seconds


def main():
    parser = common.make_parser(__doc__)
    add_flags(parser, steps=30)
    args = parser.parse_args()
    model_dir = bda.demo_model(args.model)
    processed = bda.processed_demo_data(model_dir, ROOT / "bench" / "results" / f"padding_data_{args.model}",
                                        "--add_reasoning")
    results = {s: measure(s, processed, model_dir, args.steps, args.batch_size)
               for s in ("pad_to_2048", "dynamic", "group_by_length", "packing")}
    base = results["pad_to_2048"][0]
    print(f"model {args.model} ({model_dir.name}), {args.steps} steps x {args.batch_size} rows, CPU fp32")
    print(f"{'strategy':18}{'real tokens/s':>15}{'vs pad-to-2048':>16}{'real-token share':>18}{'seconds':>9}")
    for name, (rate, share, seconds) in results.items():
        print(f"{name:18}{rate:>15,.0f}{rate / base:>15.1f}x{share:>17.1%}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
