"""LoRA / QLoRA supervised fine-tuning of DeepSeek-R1-Distill-Llama-8B on preprocessed PMC-VQA.

    python train_sft_example.py --data_path PMC-VQA-Processed --output_dir PMC-VQA-SFT-Output
    python train_sft_example.py --load_in_4bit --gradient_checkpointing          # QLoRA on one 24 GB GPU
    torchrun --nproc_per_node 4 train_sft_example.py --data_path PMC-VQA-Processed   # DDP, same script
    accelerate launch --config_file configs/accelerate/fsdp.yaml train_sft_example.py ...

    python train_sft_example.py --data_path demo_outputs/processed --model_name_or_path demo_assets/tiny-r1-llama \
        --output_dir demo_outputs/sft @configs/demo/train.args                   # a recipe file, then overrides

Writes <output_dir>/checkpoint-*/, final_model/ (LoRA adapter + tokenizer + README), eval_results.json,
training_summary.json and loss_curve.png. final_model/ and the JSON files appear only once complete.
Loss is computed on the completion only (the labels preprocessing wrote). At every evaluation a fixed
validation subset is also answered with inference_example.py's option scorer (eval_accuracy): validation
loss is mostly the fixed answer format, so the best checkpoint, saved as final_model/, is picked by accuracy.
"""
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import common
from common import UsageError


def make_parser():
    parser = common.make_parser(__doc__)
    arg = parser.add_argument
    arg("--data_path", default=common.PROCESSED_DIR,
        help="output of preprocess_pmc_vqa_for_sft.py (default: %(default)s)")
    arg("--model_name_or_path", default=common.MODEL_PATH, help="base model (default: %(default)s)")
    arg("--output_dir", default=common.OUTPUT_DIR, help="checkpoints and final_model/ (default: %(default)s)")
    arg("--max_samples", type=int, default=None, help="train on at most this many rows (default: all)")
    arg("--num_epochs", type=float, default=1.0, help="passes over the training rows (default: %(default)s)")
    arg("--batch_size", type=int, default=4, help="rows per device per step (default: %(default)s)")
    arg("--grad_accum", type=int, default=4, help="gradient accumulation steps (default: %(default)s)")
    arg("--learning_rate", type=float, default=2e-4, help="peak LR, cosine decay, 3%% warmup (default: %(default)s)")
    arg("--lora_r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    arg("--lora_alpha", type=int, default=32, help="LoRA scaling numerator (default: %(default)s)")
    arg("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA path (default: %(default)s)")
    arg("--target_modules", nargs="+", default=["all-linear"],
        help="modules that get LoRA; 'all-linear' = every linear projection but the output head "
             "(q/k/v/o/gate/up/down_proj on Llama) (default: %(default)s)")
    arg("--load_in_8bit", action="store_true", help="load the base in 8-bit (bitsandbytes)")
    arg("--load_in_4bit", action="store_true", help="QLoRA: load the base in 4-bit nf4 with double quantization")
    arg("--packing", action="store_true",
        help="padding-free batches: rows are concatenated with per-row position_ids, so no token is padding and "
             "no row attends to another. Fastest on GPUs with flash-attention; on CPU it is slower than the "
             "default dynamic padding (no variable-length attention kernel there)")
    arg("--group_by_length", action="store_true", help="batch rows of similar length together (less padding)")
    arg("--gradient_checkpointing", action="store_true", help="trade compute for memory (non-reentrant)")
    arg("--use_liger_kernel", action="store_true",
        help="Liger's fused kernels (Trainer's own switch): the fused linear + cross-entropy never materialises the "
             "[tokens, vocab] logits, the largest memory cost of the 8B's loss. Needs a CUDA GPU and "
             "pip install liger-kernel")
    arg("--eval_steps", type=int, default=200,
        help="evaluate on validation and save a checkpoint every N steps: a checkpoint at every evaluation is what "
             "lets the best one become final_model/ (default: %(default)s)")
    arg("--logging_steps", type=int, default=10, help="log the training loss every N steps (default: %(default)s)")
    arg("--resume_from_checkpoint", default=None,
        help="a checkpoint folder, or 'auto' for the latest complete one in --output_dir (default: start fresh)")
    arg("--eval_accuracy_samples", type=int, default=200,
        help="validation questions scored for accuracy at every evaluation (the first N of the split, the same "
             "each time); 0 = loss only (default: %(default)s)")
    arg("--metric_for_best_model", choices=["accuracy", "loss"], default=None,
        help="which validation metric picks final_model/ and drives early stopping (default: accuracy when "
             "--eval_accuracy_samples > 0, else loss)")
    arg("--early_stopping_patience", type=int, default=0,
        help="stop after N evaluations without a better validation metric; 0 = never (default: %(default)s)")
    arg("--report_to", choices=["none", "tensorboard", "wandb"], default="none",
        help="where to stream metrics; tensorboard and wandb need their package installed (default: %(default)s)")
    arg("--seed", type=int, default=42, help="seed of LoRA init, dropout and data order (default: %(default)s)")
    arg("--merge", action="store_true",
        help="also save merged_model/: the base with the adapter folded in (16-bit bases only)")
    arg("--trust_remote_code", action="store_true", help="allow the model folder to run its own code")
    return parser


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if args.load_in_8bit and args.load_in_4bit:
        raise UsageError("--load_in_8bit and --load_in_4bit are exclusive; pick one (4-bit uses less memory)")
    if args.merge and (args.load_in_8bit or args.load_in_4bit):
        raise UsageError("--merge cannot fold an adapter into a quantized base; train without --merge, then merge "
                         "into the base reloaded in 16-bit (QUICKSTART_GUIDE.md, 'Merging a QLoRA adapter')")
    if args.packing and args.group_by_length:
        raise UsageError("--packing and --group_by_length both fight padding; pick one")
    for name in ("batch_size", "grad_accum", "eval_steps", "logging_steps", "lora_r"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_epochs <= 0 or (args.max_samples is not None and args.max_samples < 1):
        raise UsageError("--num_epochs and --max_samples must be positive")
    if args.eval_accuracy_samples < 0:
        raise UsageError(f"--eval_accuracy_samples must be 0 or more, got {args.eval_accuracy_samples}")
    args.metric_for_best_model = args.metric_for_best_model or ("accuracy" if args.eval_accuracy_samples else "loss")
    if args.metric_for_best_model == "accuracy" and not args.eval_accuracy_samples:
        raise UsageError("--metric_for_best_model accuracy needs --eval_accuracy_samples > 0")
    if args.use_liger_kernel:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise UsageError("--use_liger_kernel needs liger-kernel: pip install liger-kernel (GPU only)")
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--use_liger_kernel needs a CUDA GPU (its kernels are Triton); drop the flag on CPU")
    return args


def load_processed_dataset(data_path, max_samples, accuracy_samples=0):
    """train and validation splits with only the tensors the model needs, and the first accuracy_samples
    validation questions as records for option scoring; clear errors for anything else."""
    hint = f"run: python preprocess_pmc_vqa_for_sft.py --output_dir {data_path}"
    if not (Path(data_path) / "dataset_dict.json").exists():
        raise UsageError(f"{data_path} is not a complete processed dataset (an interrupted or missing run); {hint}")
    from datasets import load_from_disk

    splits = load_from_disk(str(data_path))
    for name in ("train", "validation"):
        if name not in splits or "labels" not in splits[name].column_names:
            raise UsageError(f"{data_path} lacks a '{name}' split with labels; {hint}")
        split = splits[name]
        if max_samples:
            split = split.select(range(min(max_samples, len(split))))
        if not len(split) or not any(t != -100 for labels in split["labels"] for t in labels):
            raise UsageError(f"the {name} split of {data_path} has no trainable tokens; {hint}")
        splits[name] = split
    questions = splits["validation"].select(range(min(accuracy_samples, len(splits["validation"]))))
    questions = questions.select_columns(["id", "question", "options", "answer_label"]).to_list()
    tensors = ["input_ids", "attention_mask", "labels"]
    return splits["train"].select_columns(tensors), splits["validation"].select_columns(tensors), questions


def pick_precision():
    """(torch dtype, TrainingArguments kwargs) for this hardware: bf16, fp16, or fp32 on CPU."""
    import torch

    dtype = common.pick_dtype()
    if dtype == torch.float32:
        return dtype, {"use_cpu": True}  # use_cpu: without it torchrun on CPU never wraps the model in DDP
    return dtype, {"bf16": True} if dtype == torch.bfloat16 else {"fp16": True}


def setup_model_and_tokenizer(args, dtype):
    """Base model (optionally 8/4-bit) with LoRA adapters on top; only the adapters train."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tokenizer = common.load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    quantization = common.quantization_config(args.load_in_4bit, args.load_in_8bit, dtype)
    device_map = None
    if quantization:
        # Quantized weights cannot be moved after loading: place each rank's copy on its own device.
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype, device_map=device_map,
                                                 quantization_config=quantization,
                                                 trust_remote_code=args.trust_remote_code)
    model.config.use_cache = False  # the KV cache is useless in training and breaks packed attention masks
    if quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph for LoRA
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules if args.target_modules != ["all-linear"] else "all-linear",
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def scoring_trainer_class():
    """Trainer whose every evaluation also answers a fixed set of validation questions with the option scorer
    of inference_example.py (one implementation, imported): eval_accuracy and the most-predicted letter's share
    join eval_loss before they are logged and before the best checkpoint is chosen. Neither TRL nor Trainer
    offer accuracy by option scoring during SFT, hence this small subclass.
    """
    from transformers import Trainer

    import inference_example

    class ScoringTrainer(Trainer):
        def __init__(self, *args, accuracy_questions=(), prompt_format=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.accuracy_questions, self.prompt_format = list(accuracy_questions), prompt_format
            self.last_accuracy = None

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            if self.accuracy_questions:
                output.metrics.update(self.score_validation(kwargs.get("metric_key_prefix", "eval")))
            return output

        def score_validation(self, prefix):
            # Every rank scores the same questions on its unwrapped model: no collective, so no deadlock,
            # and every rank agrees on the best checkpoint.
            start = time.time()
            settings = SimpleNamespace(batch_size=self.args.per_device_eval_batch_size)
            self.last_accuracy = inference_example.evaluate(self.model.eval(), self.processing_class,
                                                            self.accuracy_questions, self.prompt_format, "score",
                                                            settings)
            seconds = time.time() - start
            if self.is_world_process_zero():
                summary = self.last_accuracy
                print(f"step {self.state.global_step}: validation accuracy {summary['accuracy']:.3f} on "
                      f"{summary['n']} questions (most predicted {summary['most_predicted_letter']} "
                      f"{summary['most_predicted_share']:.0%}), scored in {seconds:.1f} s")
            return {f"{prefix}_accuracy": self.last_accuracy["accuracy"],
                    f"{prefix}_most_predicted_share": self.last_accuracy["most_predicted_share"],
                    f"{prefix}_accuracy_seconds": seconds}

    return ScoringTrainer


def build_trainer(args, model, tokenizer, train, validation, precision, accuracy_questions=()):
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, EarlyStoppingCallback,
                              TrainingArguments)

    if args.packing:
        collator = DataCollatorWithFlattening()  # one row of concatenated sequences + per-sequence position_ids
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    quantized = args.load_in_4bit or args.load_in_8bit
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        # schedule
        num_train_epochs=args.num_epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a value below 1 is a fraction of the total steps: 3% warm-up
        weight_decay=0.0,
        seed=args.seed,
        data_seed=args.seed,
        # evaluation, saving, best model
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,  # Trainer restores the best only if it was saved when it was evaluated
        save_total_limit=3,
        load_best_model_at_end=True,
        metric_for_best_model=args.metric_for_best_model,  # "accuracy" or "loss": Trainer prefixes "eval_"
        greater_is_better=args.metric_for_best_model == "accuracy",
        # batching and memory
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        activation_checkpointing=args.gradient_checkpointing and not quantized,  # kbit prep already enabled it
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=args.use_liger_kernel,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        # logging and precision
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not sys.stderr.isatty(),
        **precision)
    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []
    return scoring_trainer_class()(
        model=model, args=training_args, train_dataset=train, eval_dataset=validation, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks, accuracy_questions=accuracy_questions,
        prompt_format=common.PromptFormat.from_processed(args.data_path, tokenizer) if accuracy_questions else None)


def resolve_checkpoint(resume, output_dir):
    """None, a given checkpoint, or with 'auto' the newest one whose save finished (trainer_state.json last)."""
    if resume is None:
        return None
    if resume != "auto":
        if not (Path(resume) / "trainer_state.json").exists():
            raise UsageError(f"--resume_from_checkpoint {resume} is not a complete checkpoint folder; "
                             f"use 'auto' or one of {output_dir}/checkpoint-*")
        return resume
    complete = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    if not complete:
        print(f"no complete checkpoint in {output_dir}: starting fresh")
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1])))


def plot_loss_curve(log_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss (completion tokens)", title="PMC-VQA SFT")
    accuracy = [(entry["step"], entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]
    if accuracy:
        right = ax.twinx()
        right.plot(*zip(*accuracy), marker="s", color="tab:green", label="validation accuracy")
        right.set(ylabel="validation accuracy", ylim=(0, 1))
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_final_model(trainer, tokenizer, args, metrics):
    """final_model/ = adapter + tokenizer + README, renamed into place once whole."""
    final, tmp = Path(args.output_dir) / "final_model", Path(args.output_dir) / "final_model.incomplete"
    trainer.save_model(str(tmp))  # every rank calls it (FSDP/DeepSpeed gather); only rank 0 writes
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(tmp)
    flags = " ".join(sys.argv[1:]) or "(defaults)"
    (tmp / "README.md").write_text(
        f"# PMC-VQA LoRA adapter\n\nBase model: {args.model_name_or_path}\nData: {args.data_path}\n"
        f"Command: python train_sft_example.py {flags}\n\nFinal validation loss: {metrics['eval_loss']:.4f} "
        f"(perplexity {metrics['perplexity']:.3f}) after {metrics['steps']} steps.\n\n"
        f"Use: python inference_example.py --model_name_or_path {args.model_name_or_path} --adapter_path {final}\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if args.merge:
        merged, tmp = Path(args.output_dir) / "merged_model", Path(args.output_dir) / "merged_model.incomplete"
        trainer.model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(merged, ignore_errors=True)
        os.replace(tmp, merged)


def peak_memory_gb():
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_rss_gb": round(rss, 3), "peak_gpu_memory_gb": round(gpu, 3) if gpu is not None else None}


def final_metrics(trainer, result, train_seconds, dtype):
    """What eval_results.json reports; the validation metrics are the best checkpoint's (restored at the end)."""
    evaluation = trainer.evaluate()
    eval_loss = evaluation["eval_loss"]
    tokens = int(trainer.state.num_input_tokens_seen)
    accuracy = trainer.last_accuracy
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50)),
            "eval_accuracy": evaluation.get("eval_accuracy"),
            "most_predicted_letter": accuracy and accuracy["most_predicted_letter"],
            "most_predicted_share": accuracy and accuracy["most_predicted_share"],
            "collapse_warning": accuracy and accuracy["collapse_warning"],
            "best_model_metric": trainer.args.metric_for_best_model, "best_metric": trainer.state.best_metric,
            "train_loss": result.training_loss, "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
            "best_checkpoint": trainer.state.best_model_checkpoint, "tokens_seen": tokens,
            "tokens_per_second": tokens / train_seconds, "train_seconds": train_seconds,
            "world_size": trainer.args.world_size, "device": str(trainer.args.device), "dtype": str(dtype),
            **peak_memory_gb()}


def write_reports(trainer, args, metrics):
    output = Path(args.output_dir)
    plot_loss_curve(trainer.state.log_history, output / "loss_curve.png")
    common.write_json_atomic(output / "training_summary.json",
                             {"args": vars(args), "metrics": metrics, "log_history": trainer.state.log_history})
    common.write_json_atomic(output / "eval_results.json", metrics)
    accuracy = f", accuracy {metrics['eval_accuracy']:.3f}" if metrics["eval_accuracy"] is not None else ""
    print(f"validation loss {metrics['eval_loss']:.4f} (perplexity {metrics['perplexity']:.3f}){accuracy}; "
          f"final_model/ is the best checkpoint by {metrics['best_model_metric']} ({metrics['best_metric']:.4f}); "
          f"{metrics['steps']} steps, {metrics['tokens_per_second']:.0f} tokens/s")
    if metrics["collapse_warning"]:
        print(f"WARNING: validation answers {metrics['collapse_warning']}")
    print(f"wrote {output}/final_model, eval_results.json, training_summary.json, loss_curve.png")
    print(f"next: python inference_example.py --evaluate --model_name_or_path {args.model_name_or_path} "
          f"--adapter_path {output / 'final_model'} --data_path {args.data_path}")


def main(argv=None):
    args = parse_args(argv)
    train, validation, accuracy_questions = load_processed_dataset(args.data_path, args.max_samples,
                                                                   args.eval_accuracy_samples)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    from transformers import set_seed

    set_seed(args.seed)
    dtype, precision = pick_precision()
    model, tokenizer = setup_model_and_tokenizer(args, dtype)
    trainer = build_trainer(args, model, tokenizer, train, validation, precision, accuracy_questions)
    world = trainer.args.world_size
    trainable, total = model.get_nb_trainable_parameters()
    if trainer.is_world_process_zero():
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
              f"precision {dtype}; effective batch {args.batch_size} x {args.grad_accum} x {world} processes "
              f"= {args.batch_size * args.grad_accum * world} rows; {len(train)} train / {len(validation)} "
              "validation rows")

    start = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = final_metrics(trainer, result, time.time() - start, dtype)
    save_final_model(trainer, tokenizer, args, metrics)
    if trainer.is_world_process_zero():
        write_reports(trainer, args, metrics)
    return trainer


if __name__ == "__main__":
    common.run_main(main)
