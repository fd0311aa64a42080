"""Is the demo's improvement real or a lucky seed? Train the demo's recipe with 3 seeds and evaluate each.

    python bench/bench_demo_seeds.py              # seeds 0 1 2, the full demo data (about 2 minutes a seed)

Uses the recipe files of `make demo` (configs/demo/*.args, so the two cannot drift) and the full held-out
test split. Pass: score >= 80% and greedy generate >= 70% for every seed.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402


def run(*args):
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: %(default)s)")
    args = parser.parse_args()
    data_dir, model_dir = bda.build_all(bda.DEMO_DIR)
    work = ROOT / "bench" / "results" / "demo_seeds"
    processed = work / "processed"
    run("preprocess_pmc_vqa_for_sft.py", "--data_path", data_dir, "--model_name_or_path", model_dir,
        "--output_dir", processed, bda.DEMO_RECIPES["preprocess"])
    rows = []
    for seed in args.seeds:
        out = work / f"seed{seed}"
        run("train_sft_example.py", "--data_path", processed, "--model_name_or_path", model_dir, "--output_dir", out,
            bda.DEMO_RECIPES["train"], "--seed", seed)
        run("inference_example.py", "--evaluate", "--method", "both", "--compare_base", "--model_name_or_path",
            model_dir, "--adapter_path", out / "final_model", "--data_path", processed)
        results = json.loads((out / "final_model" / "evaluation_results.json").read_text())["results"]
        rows.append((seed, {name: r["accuracy"] for name, r in results.items()}, results["fine_tuned/score"]["n"]))
    print(f"{'seed':>4}{'base score':>12}{'base gen':>10}{'tuned score':>13}{'tuned gen':>11}{'n':>6}  verdict")
    for seed, acc, n in rows:
        ok = acc["fine_tuned/score"] >= 0.8 and acc["fine_tuned/generate"] >= 0.7
        print(f"{seed:>4}{acc['base/score']:>12.3f}{acc['base/generate']:>10.3f}{acc['fine_tuned/score']:>13.3f}"
              f"{acc['fine_tuned/generate']:>11.3f}{n:>6}  {'pass' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
