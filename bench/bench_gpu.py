"""Measure the 8B recipe and the Qwen2.5-VL-7B recipe on one GPU without downloading either: `make gpu-check`.

    python bench/bench_gpu.py                                  # one CUDA GPU: the 8B, then the 7B VLM
    python bench/bench_gpu.py --shape r1-8b --configs lora recipe_24gb score
    python bench/bench_gpu.py --shape tiny                     # the same code on the demo models, CPU, ~1 minute

Randomly initialised models of the real geometries (written below from each model's public config.json) are
saved once in bf16 and driven through the training script's own functions (setup_model, build_trainer: the
collator and the Trainer) and the inference script's evaluate(). Speed and memory do not depend on the weights'
values. The tokenizers are the demo's (the R1 special tokens; Qwen's ChatML and vision tokens): their ids are
valid in the real vocabularies.

8B training rows: token lengths come from --lengths_from (a processed dataset: use your real preprocessing
output for real lengths), else from the ASSUMED prompt and completion ranges below (prompts ~120-260 tokens).
VLM training rows: real processed rows of synthetic 1024x768 figures (the size of a typical PMC figure) with the
recipe's --max_pixels cap, so the image-token count is what the recipe produces; image tokens are counted apart
from text tokens. Each configuration runs --warmup_steps optimizer steps, then --steps timed ones, then one timed
evaluation (validation loss on the same rows, --eval_questions scored for accuracy): hours per epoch include the
evaluations the family's recipe (configs/r1-8b/train.args, configs/qwen2.5-vl-7b/train.args) runs at its
schedule, and their share of the time is a column of its own. An out-of-memory or a missing package becomes a table
entry. `recipe_*` rows are the recommended recipes whole
(QUICKSTART_GUIDE.md, "Hardware"), with their batch and accumulation. Writes bench/results/gpu_<shape>.json.
"""
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_demo_assets as bda  # noqa: E402
import common  # noqa: E402

RESULTS = ROOT / "bench" / "results"
R1_8B_GEOMETRY = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
QWEN25_VL_7B_GEOMETRY = dict(
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     bos_token_id=None),
    tie_word_embeddings=False)
ASSUMED_PROMPT_TOKENS, ASSUMED_COMPLETION_TOKENS = (120, 260), (10, 24)
V1_TRAIN_ROWS = 168_100  # train.csv's 176,948 rows less the ~5% of figures held out for validation
RECIPES = {False: ROOT / "configs" / "r1-8b" / "train.args", True: ROOT / "configs" / "qwen2.5-vl-7b" / "train.args"}
VLM_MAX_PIXELS = 512 * 28 * 28  # the Qwen2.5-VL recipe's cap (configs/qwen2.5-vl-7b/preprocess.args)
FIGURE_SIZE = (1024, 768)
# name: (extra training flags, batch, accumulation); batch None = --batch_size
TEXT_TRAINING = {"lora": ([], None, 1), "packing": (["--packing"], None, 1),
                 "checkpointing": (["--gradient_checkpointing"], None, 1), "liger": (["--use_liger_kernel"], None, 1),
                 "8bit": (["--load_in_8bit"], None, 1), "4bit": (["--load_in_4bit"], None, 1),
                 "recipe_24gb": (["--load_in_4bit", "--gradient_checkpointing"], 4, 4),
                 "recipe_48gb": (["--gradient_checkpointing"], 4, 4),
                 "recipe_80gb": (["--packing"], 8, 2)}
VLM_TRAINING = {"vlm_lora": ([], None, 1), "vlm_4bit": (["--load_in_4bit"], None, 1),
                "vlm_recipe": (["--gradient_checkpointing"], 4, 4)}  # configs/qwen2.5-vl-7b/train.args
EVALUATION = {"score": ("score", 1), "letter": ("letter", 1), "generate32": ("generate", 32),
              "generate512": ("generate", 512), "vlm_score": ("score", 1), "vlm_generate32": ("generate", 32)}
NEEDS = {"liger": "liger_kernel", "8bit": "bitsandbytes", "4bit": "bitsandbytes", "vlm_4bit": "bitsandbytes",
         "recipe_24gb": "bitsandbytes"}
SHAPES = {"r1-8b": [*TEXT_TRAINING, "score", "letter", "generate32", "generate512"],
          "qwen2.5-vl-7b": [*VLM_TRAINING, "vlm_score", "vlm_generate32"],
          "tiny": [*TEXT_TRAINING, *VLM_TRAINING, "score", "letter", "generate32", "vlm_score", "vlm_generate32"]}
SIZES = {"batch_size": 8, "warmup_steps": 2, "steps": 8, "eval_questions": 64}
TINY_SIZES = {"batch_size": 4, "warmup_steps": 1, "steps": 2, "eval_questions": 4}  # a wiring check


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all",
                        help="models: the real geometries on a GPU, or tiny (both demo models, CPU) "
                             "(default: %(default)s = r1-8b and qwen2.5-vl-7b)")
    parser.add_argument("--configs", nargs="+", choices=[*TEXT_TRAINING, *VLM_TRAINING, *EVALUATION], default=None,
                        help="what to measure (default: every row of the shape)")
    parser.add_argument("--batch_size", type=int, default=None, help="training rows per step of the single-knob "
                                                                     "rows (default: 8; tiny 4)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default: 2; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 8; tiny 2)")
    parser.add_argument("--eval_questions", type=int, default=None, help="questions per method (default: 64; tiny 4)")
    parser.add_argument("--lengths_from", default=None,
                        help="a processed dataset whose train rows give the 8B's token lengths (default: the assumed "
                             "ranges in this docstring)")
    return parser


def random_model(name, build):
    """A folder of random bf16 weights of a real geometry, built on the GPU once."""
    folder = RESULTS / f"{name}-random"
    if not (folder / "model.safetensors.index.json").exists():
        import torch

        shutil.rmtree(folder, ignore_errors=True)
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            build(folder)
            torch.set_default_dtype(torch.float32)
        torch.cuda.empty_cache()
    return folder


def r1_8b(folder):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bda.Assets(bda.DEMO_DIR).model)
    LlamaForCausalLM(LlamaConfig(**R1_8B_GEOMETRY, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def qwen25_vl_7b(folder):
    """Qwen2.5-VL-7B's geometry with the tiny Qwen2-VL's tokenizer and processor files (the same image
    processor class as the real model's)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = bda.Assets(bda.DEMO_DIR).qwen_vl
    small = json.loads((tiny / "config.json").read_text())
    ids = {key: small[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id")}
    geometry = json.loads(json.dumps(QWEN25_VL_7B_GEOMETRY))
    geometry["text_config"].update(eos_token_id=small["text_config"]["eos_token_id"],
                                   pad_token_id=small["text_config"]["pad_token_id"])
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**geometry, **ids)).save_pretrained(folder)
    for file in tiny.iterdir():
        if file.suffix in (".json", ".jinja", ".py") and file.name not in ("config.json", "generation_config.json"):
            shutil.copy(file, folder / file.name)


def figure_data(folder):
    """A v1-schema CSV of synthetic questions on 1024x768 figures (noise: pixels do not change the speed)."""
    import numpy as np
    from PIL import Image

    if (folder / "test_clean.csv").exists():
        return folder
    rng = random.Random(0)
    rows, _ = bda.synthetic_rows(96, rng, "PMCB", bda.IMAGE_TEMPLATES)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0)
    for figure in sorted({row[0] for row in rows}):
        noise = pixels.integers(0, 256, (*FIGURE_SIZE[::-1], 3), dtype="uint8")
        Image.fromarray(noise).save(folder / "images" / figure)
    for name in ("train.csv", "test_clean.csv"):
        bda.write_csv(folder / name, rows)
    return folder


class Setup:
    """The model folder and the processed data one family is measured on."""

    def __init__(self, shape, vlm):
        assets = bda.Assets(bda.DEMO_DIR)
        self.vlm = vlm
        if shape == "tiny":
            self.folder = assets.qwen_vl if vlm else assets.model
            data, flags = (assets.image_data, []) if vlm else (assets.data, [])
        elif vlm:
            self.folder = random_model("qwen2.5-vl-7b", qwen25_vl_7b)
            data, flags = figure_data(RESULTS / "gpu_figures"), ["--max_pixels", str(VLM_MAX_PIXELS)]
        else:
            self.folder = random_model("r1-8b", r1_8b)
            data, flags = assets.data, []
        self.processed = bda.processed_demo_data(self.folder, RESULTS / f"gpu_data_{shape}_{'vlm' if vlm else 'text'}",
                                                 "--trust_remote_code", *flags, data_path=data)


def training_rows(setup, count, lengths_from, seed=0):
    """(rows, mean tokens per row, image share of them). VLM: the processed rows themselves; 8B: random ids
    whose prompt/completion lengths follow the chosen distribution."""
    from datasets import Dataset, load_from_disk

    rng = random.Random(seed)
    if setup.vlm:
        train = load_from_disk(str(setup.processed))["train"]
        rows = train.select([i % len(train) for i in range(count)])
        image_token = json.loads((setup.folder / "config.json").read_text())["image_token_id"]
        lengths = [len(ids) for ids in rows["input_ids"]]
        images = sum(ids.count(image_token) for ids in rows["input_ids"])
        return rows, sum(lengths) / len(lengths), images / sum(lengths)
    if lengths_from:
        train = load_from_disk(str(lengths_from))["train"]
        lengths = [(labels.count(-100), len(labels) - labels.count(-100)) for labels in train["labels"][:5000]]
    else:
        lengths = [(rng.randint(*ASSUMED_PROMPT_TOKENS), rng.randint(*ASSUMED_COMPLETION_TOKENS)) for _ in range(5000)]
    vocab_size = json.loads((setup.folder / "config.json").read_text())["vocab_size"]
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(count):
        prompt, completion = rng.choice(lengths)
        ids = [rng.randrange(10, vocab_size) for _ in range(prompt + completion)]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(rows), sum(p + c for p, c in lengths) / len(lengths), 0.0


def measure_training(name, setup, args):
    import torch
    from transformers import TrainerCallback

    import model_kinds
    import train_sft_example as train

    flags, batch, accumulation = {**TEXT_TRAINING, **VLM_TRAINING}[name]
    batch = batch or args.batch_size
    steps = args.warmup_steps + args.steps
    rows, mean_tokens, image_share = training_rows(setup, steps * batch * accumulation, args.lengths_from)
    run_args = train.parse_args(["--model_name_or_path", str(setup.folder), "--data_path", str(setup.processed),
                                 "--output_dir", str(RESULTS / "gpu_trainer"), "--batch_size", str(batch),
                                 "--grad_accum", str(accumulation), "--eval_accuracy_samples", "0",
                                 "--trust_remote_code", *flags])
    prompter = model_kinds.Prompter.from_processed(setup.processed, setup.folder, trust_remote_code=True)
    dtype, precision = train.pick_precision()
    model = train.setup_model(run_args, dtype, prompter.reads_images)
    rows = rows.select_columns(prompter.training_columns)
    questions = train.load_processed_dataset(setup.processed, None, args.eval_questions, prompter.training_columns)[2]
    trainer = train.build_trainer(run_args, model, prompter, rows, rows, train.training_arguments(run_args, precision),
                                  questions)
    for key, value in {"max_steps": steps, "eval_strategy": "no", "save_strategy": "no",
                       "load_best_model_at_end": False, "logging_steps": steps}.items():
        setattr(trainer.args, key, value)

    class Clock(TrainerCallback):  # times the steps after warm-up
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start, self.tokens = time.time(), state.num_input_tokens_seen

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tokens_per_second = (trainer.state.num_input_tokens_seen - clock.tokens) / (time.time() - clock.start)
    training_hours = V1_TRAIN_ROWS * mean_tokens / tokens_per_second / 3600
    evaluation_hours = evaluations_per_epoch_hours(trainer, run_args, len(rows), len(questions), setup.vlm)
    images = {"image_tokens_per_second": round(tokens_per_second * image_share)} if setup.vlm else {}
    return {"tokens_per_second": round(tokens_per_second), **images, "batch": f"{batch}x{accumulation}",
            "hours_per_v1_epoch": round(training_hours + evaluation_hours, 2),
            "evaluation_share": round(evaluation_hours / (training_hours + evaluation_hours), 3)}


def evaluations_per_epoch_hours(trainer, run_args, rows, questions, vlm):
    """Hours an epoch spends evaluating at the recipe's schedule: every --eval_steps optimizer steps (of this row's
    batch), --max_eval_samples rows of validation loss and --eval_accuracy_samples scored questions, each timed
    here once on the measured rows and questions."""
    import train_sft_example as train

    recipe = train.make_parser().parse_args([f"@{RECIPES[vlm]}"])
    metrics = trainer.evaluate()
    seconds_per_question = metrics["eval_accuracy_seconds"] / questions
    seconds_per_row = (metrics["eval_runtime"] - metrics["eval_accuracy_seconds"]) / rows
    steps = V1_TRAIN_ROWS / (run_args.batch_size * run_args.grad_accum)
    per_evaluation = recipe.max_eval_samples * seconds_per_row + recipe.eval_accuracy_samples * seconds_per_question
    return steps // recipe.eval_steps * per_evaluation / 3600


def measure_evaluation(name, setup, args):
    import inference_example as inference

    method, budget = EVALUATION[name]
    run_args = inference.parse_args(["--model_name_or_path", str(setup.folder), "--no_adapter", "--data_path",
                                     str(setup.processed), "--num_samples", str(args.eval_questions),
                                     "--max_new_tokens", str(budget), "--trust_remote_code"])
    model, prompter = inference.load_model(run_args)
    if method == "generate":  # a random model never stops by itself: every question uses the whole budget
        model.generation_config.eos_token_id = None
    result = inference.evaluate(model, prompter, inference.load_eval_questions(run_args), method, run_args)
    return {"questions_per_second": round(result["questions_per_second"], 2)}


def measure(name, setup, args):
    """One table row; a missing package or an out-of-memory is an entry, never a crash or a made-up number."""
    import importlib.util

    import torch

    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        return {"status": f"not available (no {NEEDS[name]})"}
    if name == "liger" and not torch.cuda.is_available():
        return {"status": "not available (needs CUDA)"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        row = (measure_evaluation if name in EVALUATION else measure_training)(name, setup, args)
    except torch.cuda.OutOfMemoryError:
        return {"status": "out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"status": "ok", **row, "peak_gpu_memory_gb": round(peak, 1) if peak else None}


def print_table(shape, device, args, rows):
    print(f"\n{shape} on {device}, single-knob rows at batch {args.batch_size}, {args.steps} timed optimizer steps "
          f"after {args.warmup_steps}")
    print(f"{'config':16}{'status':28}{'batch':>7}{'tokens/s':>10}{'image tok/s':>13}{'h/epoch v1':>12}"
          f"{'eval %':>8}{'questions/s':>13}{'peak GB':>9}")
    for name, row in rows.items():
        share = f"{row['evaluation_share']:.0%}" if "evaluation_share" in row else ""
        print(f"{name:16}{row['status']:28}{row.get('batch', ''):>7}{row.get('tokens_per_second', ''):>10}"
              f"{row.get('image_tokens_per_second', ''):>13}{row.get('hours_per_v1_epoch', ''):>12}{share:>8}"
              f"{row.get('questions_per_second', ''):>13}{row.get('peak_gpu_memory_gb') or '':>9}")


def main(argv=None):
    args = make_parser().parse_args(argv)
    import torch

    shapes = ["r1-8b", "qwen2.5-vl-7b"] if args.shape == "all" else [args.shape]
    if shapes != ["tiny"] and not torch.cuda.is_available():
        raise common.UsageError(f"--shape {args.shape} needs a CUDA GPU; use --shape tiny on a CPU")
    for key, value in (TINY_SIZES if shapes == ["tiny"] else SIZES).items():
        setattr(args, key, getattr(args, key) or value)
    bda.build_all(bda.DEMO_DIR)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    for shape in shapes:
        configs = [name for name in SHAPES[shape] if args.configs is None or name in args.configs]
        setups = {vlm: Setup(shape, vlm) for vlm in {name.startswith("vlm") for name in configs}}
        rows = {}
        for name in configs:
            rows[name] = measure(name, setups[name.startswith("vlm")], args)
            print(f"{name}: {rows[name]}", flush=True)
        print_table(shape, device, args, rows)
        output = RESULTS / f"gpu_{shape}.json"
        common.write_json_atomic(output, {"shape": shape, "device": device, "date": time.strftime("%Y-%m-%d"),
                                          "command": " ".join(sys.argv), "rows": rows})
        print(f"wrote {output}")


if __name__ == "__main__":
    common.run_main(main)
