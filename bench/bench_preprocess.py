"""Preprocessing at full PMC-VQA v1 size: our batched datasets.map vs the naive per-row way, side by side.

    python bench/bench_preprocess.py                 # 227k rows (train.csv + test.csv size), naive on 10k
    python bench/bench_preprocess.py --rows 20000    # quicker

The naive way is what many tutorials do: a Python loop over pandas rows, apply_chat_template per row,
tokenize each row padded to max_length (2048). Its rows/s and bytes/row are measured on --naive_rows rows
and its totals extrapolated linearly (it is linear: one row at a time).
"""
import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402


def folder_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_measured(command, *args):
    """Run a child Python; return (seconds, peak RSS in GB of its largest process).

    A fresh wrapper process per run, so one run's peak cannot leak into the other's RUSAGE_CHILDREN.
    """
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *command, *map(str, args)], check=True,
                         cwd=ROOT, capture_output=True, text=True).stdout
    return time.time() - start, int(out.split()[-1]) / 2**20


NAIVE = """
import sys, pandas as pd
from datasets import Dataset
from transformers import AutoTokenizer
sys.path.insert(0, '.')
import common
csv_path, model, out, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
records = {"input_ids": [], "attention_mask": [], "labels": []}
for _, row in pd.read_csv(csv_path, dtype=str, keep_default_na=False).head(rows).iterrows():
    options = [row[f"Choice {l}"].strip()[2:].strip() for l in "ABCD"]
    user = common.PromptFormat().user_turn(row["Question"], options)
    messages = [{"role": "user", "content": user}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    completion = common.PromptFormat().completion(row["Answer_label"], options)
    enc = tok(prompt + completion + tok.eos_token, add_special_tokens=False, padding="max_length", max_length=2048)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    labels = [-100] * n_prompt + enc["input_ids"][n_prompt:]
    labels = [l if m else -100 for l, m in zip(labels, enc["attention_mask"])]
    for key, value in (("input_ids", enc["input_ids"]), ("attention_mask", enc["attention_mask"]), ("labels", labels)):
        records[key].append(value)
Dataset.from_dict(records).save_to_disk(out)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=227_000, help="rows in the synthetic file (default: %(default)s)")
    parser.add_argument("--naive_rows", type=int, default=10_000,
                        help="rows the naive way processes (default: %(default)s)")
    parser.add_argument("--num_proc", type=int, default=2, help="processes for ours (default: %(default)s)")
    args = parser.parse_args()
    _, model_dir = bda.build_all(bda.DEMO_DIR)
    work = ROOT / "bench" / "results" / "preprocess"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.csv"
    bda.write_csv(data, bda.synthetic_rows(args.rows, random.Random(0), "PMC")[0])

    ours_s, ours_rss = run_measured(["preprocess_pmc_vqa_for_sft.py"], "--data_path", data, "--model_name_or_path",
                                    model_dir, "--output_dir", work / "ours", "--num_proc", args.num_proc)
    naive_s, naive_rss = run_measured(["-c", NAIVE], data, model_dir, work / "naive", args.naive_rows)
    ours_size, naive_size = folder_size(work / "ours"), folder_size(work / "naive")
    ours_rate, naive_rate = args.rows / ours_s, args.naive_rows / naive_s
    naive_total_gb = naive_size / args.naive_rows * args.rows / 2**30
    print(f"{'':28}{'ours (batched map)':>22}{'naive (per row, pad 2048)':>28}{'ratio':>8}")
    print(f"{'rows processed':28}{args.rows:>22,}{args.naive_rows:>28,}")
    print(f"{'wall seconds':28}{ours_s:>22.1f}{naive_s:>28.1f}")
    print(f"{'rows/s':28}{ours_rate:>22,.0f}{naive_rate:>28,.0f}{ours_rate / naive_rate:>7.1f}x")
    print(f"{'seconds for all rows':28}{ours_s:>22.1f}{args.rows / naive_rate:>28.1f}  (naive extrapolated)")
    print(f"{'peak RSS, GB':28}{ours_rss:>22.2f}{naive_rss:>28.2f}  (naive: at {args.naive_rows:,} rows; "
          "it holds every padded row in memory, so it grows with rows)")
    print(f"{'bytes on disk per row':28}{ours_size / args.rows:>22,.0f}{naive_size / args.naive_rows:>28,.0f}"
          f"{naive_size / args.naive_rows / (ours_size / args.rows):>7.1f}x")
    print(f"{'GB on disk for all rows':28}{ours_size / 2**30:>22.2f}{naive_total_gb:>28.2f}  (naive extrapolated)")


if __name__ == "__main__":
    main()
