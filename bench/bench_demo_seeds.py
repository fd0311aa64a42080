"""Is a demo's improvement real or a lucky seed? Train its recipe with 3 seeds and evaluate each on the same
held-out questions, with 95% intervals.

    python bench/bench_demo_seeds.py                  # make demo: the tiny model (about 2 minutes a seed)
    python bench/bench_demo_seeds.py --model real     # make demo-real: SmolLM2-135M-Instruct (about 5 minutes a seed)
    python bench/bench_demo_seeds.py --model vlm      # make demo-vlm: the tiny VLM against the blank-figure
                                                      # control and the text-only model (about 4 minutes a seed)

The recipes are the demos' own files (configs/demo/*.args), so the two cannot drift; the data is preprocessed
once, the seed changes training only. For the VLM the margins are paired differences on the same questions:
over its own run with a blank figure, and over the tiny text model fine-tuned on the same rows.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402
import inference_example as inference  # noqa: E402

RECIPES = ROOT / "configs" / "demo"
# model: (data, model folder, preprocess recipe, train recipe, evaluation flags) as in the Makefile's targets
DEMOS = {"tiny": ("data", "model", "preprocess", "train", ["--method", "both", "--compare_base"]),
         "real": ("data", "real", "real-preprocess", "real-train",
                  ["--compare_base", "--num_samples", "150", "--precision", "bf16"]),
         "vlm": ("image_data", "vlm", "preprocess", "train", ["--compare_base", "--image_control", "blank"])}


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{args[0]} failed:\n{result.stderr[-3000:]}")


def train_and_evaluate(data, model, preprocess_recipe, train_recipe, evaluate_flags, work, seeds):
    """{seed: evaluation report} of one model on one data folder."""
    processed = work / "processed"
    run("preprocess_pmc_vqa_for_sft.py", "--data_path", data, "--model_name_or_path", model, "--output_dir",
        processed, f"@{RECIPES / preprocess_recipe}.args")
    reports = {}
    for seed in seeds:
        out = work / f"seed{seed}"
        run("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model, "--output_dir", out,
            f"@{RECIPES / train_recipe}.args", "--seed", seed)
        run("inference_example.py", "--evaluate", *evaluate_flags, "--model_name_or_path", model,
            "--adapter_path", out / "final_model", "--data_path", processed)
        reports[seed] = json.loads((out / "final_model" / "evaluation_results.json").read_text())
    return reports


def interval(result):
    low, high = result["ci95"]
    return f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}]"


def margin(paired):
    low, high = paired["bootstrap_ci95"]
    return f"{paired['accuracy_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", choices=sorted(DEMOS), default="tiny", help="which demo (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: %(default)s)")
    args = parser.parse_args()
    bda.build_all(bda.DEMO_DIR)
    assets = bda.Assets(bda.DEMO_DIR)
    data_name, model_name, *recipe = DEMOS[args.model]
    model = bda.build_real_model(bda.DEMO_DIR) if model_name == "real" else getattr(assets, model_name)
    work = ROOT / "bench" / "results" / f"demo_seeds_{args.model}"
    reports = train_and_evaluate(getattr(assets, data_name), model, *recipe, work, args.seeds)
    text_only = train_and_evaluate(assets.image_data, assets.model, "preprocess", "train", [], work / "text_only",
                                   args.seeds) if args.model == "vlm" else {}
    print(f"{args.model}: {model.name}, {len(args.seeds)} seeds, held-out test questions, 95% intervals")
    columns = ["fine_tuned/score", "base/score"]
    if args.model == "tiny":
        columns += ["fine_tuned/generate", "base/generate"]
    header = f"{'seed':>4}  {'n':>4}  " + "  ".join(f"{name:>24}" for name in columns)
    if text_only:
        header += f"  {'- blank figure':>24}  {'- text-only model':>24}"
    print(header)
    for seed, report in reports.items():
        results = report["results"]
        line = f"{seed:>4}  {results['fine_tuned/score']['n']:>4}  " + "  ".join(
            f"{interval(results[name]):>24}" for name in columns)
        if text_only:
            blank = report["paired"]["fine_tuned/score - fine_tuned/blank_image/score"]
            versus_text = inference.paired_comparison(results["fine_tuned/score"],
                                                      text_only[seed]["results"]["fine_tuned/score"])
            line += f"  {margin(blank):>24}  {margin(versus_text):>24}"
        print(line)


if __name__ == "__main__":
    main()
