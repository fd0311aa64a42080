"""Generation in-process against through a serving engine, side by side in one run: the same held-out questions,
greedy, the same budget, through inference_example.py's own --evaluate --method generate, with and without
--server. Prints questions/s of each and their ratio.

    python bench/bench_server.py                       # SmolLM2-135M-Instruct (make real-model), local server
    python bench/bench_server.py --model tiny          # the tiny demo model
    python bench/bench_server.py --model_name_or_path models/r1-8b --server http://127.0.0.1:8000
        # the GPU row: the 8B in-process against a vLLM already serving it (vllm serve models/r1-8b --port 8000)

Without --server the engine is a real `transformers serve` started on 127.0.0.1 (bench/local_server.py): a CPU
stand-in that runs one request at a time, so its ratio says what the HTTP path costs here, not what a
paged-attention engine gains on a GPU. That row is printed as still to be measured when no GPU is present.
"""
import contextlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402
import inference_example as inference  # noqa: E402
from bench.local_server import free_port, serving  # noqa: E402


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", choices=["tiny", "real"], default="real",
                        help="the demo model to serve locally (default: %(default)s)")
    parser.add_argument("--model_name_or_path", default=None,
                        help="a model folder instead of --model, for the GPU row (default: none)")
    parser.add_argument("--server", default=None,
                        help="a server already serving that model (default: start transformers serve here)")
    parser.add_argument("--num_samples", type=int, default=32, help="questions (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="generation budget (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    return parser


def questions_per_second(flags, extra):
    """Run --evaluate as a user would; the report's questions/s and its records' answers."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "report.json"
        inference.main([*flags, *extra, "--output_file", str(output)])
        [result] = json.loads(output.read_text())["results"].values()
    return result["questions_per_second"], [record["samples"][0]["text"] for record in result["records"]]


def main(argv=None):
    import torch

    args = make_parser().parse_args(argv)
    model_dir = Path(args.model_name_or_path or bda.demo_model(args.model))
    processed = bda.processed_demo_data(model_dir, ROOT / "bench" / "results" / f"server_data_{model_dir.name}")
    flags = ["--evaluate", "--method", "generate", "--no_adapter", "--model_name_or_path", str(model_dir),
             "--data_path", str(processed), "--num_samples", str(args.num_samples), "--max_new_tokens",
             str(args.max_new_tokens)]
    in_process, local = questions_per_second(flags, [])
    started_here = serving(model_dir, free_port())  # a server given with --server is someone else's to stop
    with contextlib.nullcontext((args.server, None)) if args.server else started_here as (url, _):
        served, remote = questions_per_second(flags, ["--server", url, "--concurrency", str(args.concurrency)])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    engine = "the server given" if args.server else "transformers serve on 127.0.0.1 (CPU)"
    print(f"{model_dir.name}, {args.num_samples} questions, greedy, budget {args.max_new_tokens} tokens, {device}")
    print(f"{'generation':44}{'questions/s':>12}{'ratio':>8}")
    print(f"{'in-process (batched generate)':44}{in_process:>12.2f}{1.0:>7.2f}x")
    print(f"{'through ' + engine:44}{served:>12.2f}{served / in_process:>7.2f}x")
    print(f"same answers text for text: {sum(a == b for a, b in zip(local, remote))} of {len(local)}")
    if not torch.cuda.is_available():
        print("GPU row (the 8B in-process against vLLM serving it): still to be measured; on a GPU server run "
              "python bench/bench_server.py --model_name_or_path models/r1-8b --server http://127.0.0.1:8000")


if __name__ == "__main__":
    main()
