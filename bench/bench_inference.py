"""Evaluation throughput on the tiny model: score vs batched generate vs one-at-a-time generate.

    python bench/bench_inference.py                   # 96 test questions of the demo data

Uses the demo's fine-tuned adapter when `make demo` has run (demo_outputs/sft/final_model), else the base.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import inference_example as inference  # noqa: E402
import preprocess_pmc_vqa_for_sft as preprocess  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=96, help="questions (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="questions per batch (default: %(default)s)")
    args = parser.parse_args()
    data_dir, model_dir = bda.build_all(bda.DEMO_DIR)
    processed, adapter = ROOT / "demo_outputs" / "processed", ROOT / "demo_outputs" / "sft" / "final_model"
    if not (processed / "dataset_dict.json").exists():
        processed = ROOT / "bench" / "results" / "inference_data"
        preprocess.main(["--data_path", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir",
                         str(processed), "--add_reasoning"])
    flags = ["--model_name_or_path", str(model_dir), "--data_path", str(processed), "--num_samples",
             str(args.num_samples), "--max_new_tokens", "48"]
    flags += ["--adapter_path", str(adapter)] if (adapter / "adapter_config.json").exists() else ["--no_adapter"]
    runs = {}
    for name, method, batch_size in (("score", "score", args.batch_size),
                                     ("generate, batched", "generate", args.batch_size),
                                     ("generate, one at a time", "generate", 1)):
        run_args = inference.parse_args(flags + ["--batch_size", str(batch_size)])
        model, tokenizer = inference.load_model(run_args)
        questions, config = inference.load_eval_questions(run_args)
        start = time.time()
        result = inference.evaluate(model, tokenizer, questions, config, method, run_args)
        runs[name] = (len(questions) / (time.time() - start), result["accuracy"])
    slowest = runs["generate, one at a time"][0]
    print(f"{'method':26}{'questions/s':>13}{'vs one-at-a-time':>18}{'accuracy':>10}")
    for name, (rate, accuracy) in runs.items():
        print(f"{name:26}{rate:>13.1f}{rate / slowest:>17.1f}x{accuracy:>10.3f}")


if __name__ == "__main__":
    main()
