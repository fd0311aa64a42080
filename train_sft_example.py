"""LoRA / QLoRA supervised fine-tuning of DeepSeek-R1-Distill-Llama-8B on preprocessed PMC-VQA.

    python train_sft_example.py --data_path PMC-VQA-Processed --output_dir PMC-VQA-SFT-Output
    python train_sft_example.py --load_in_4bit --gradient_checkpointing          # QLoRA on one 24 GB GPU
    torchrun --nproc_per_node 4 train_sft_example.py --data_path PMC-VQA-Processed   # DDP, same script
    accelerate launch --config_file configs/accelerate/fsdp.yaml train_sft_example.py ...

    python train_sft_example.py --data_path demo_outputs/processed --model_name_or_path demo_assets/tiny-r1-llama \\
        --output_dir demo_outputs/sft @configs/demo/train.args                   # a recipe file, then overrides

Writes <output_dir>/checkpoint-*/, final_model/ (LoRA adapter + tokenizer + README), eval_results.json,
training_summary.json and loss_curve.png. final_model/ and the JSON files appear only once complete.
A cluster's faults end a run cleanly (run_guard.py): SIGTERM/SIGUSR1 saves a checkpoint at the next step and
exits 128 + the signal (run_status.json says why; a SLURM job requeues itself), a full disk exits 3, a
non-finite gradient norm exits 4, and a second run into a folder that run.lock shows in use exits 2.
Loss is computed on the completion only (the labels preprocessing wrote). At every evaluation a fixed
validation subset is also answered with inference_example.py's option scorer (eval_accuracy): validation
loss is mostly the fixed answer format, so the best checkpoint, saved as final_model/, is picked by accuracy.
"""
import math
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import common
import model_kinds
import run_guard
from common import UsageError


def make_parser():
    parser = common.make_parser(__doc__)
    arg = parser.add_argument
    arg("--data_path", default=common.PROCESSED_DIR,
        help="output of preprocess_pmc_vqa_for_sft.py (default: %(default)s)")
    arg("--model_name_or_path", default=common.MODEL_PATH, help="base model (default: %(default)s)")
    arg("--output_dir", default=common.OUTPUT_DIR, help="checkpoints and final_model/ (default: %(default)s)")
    arg("--max_samples", type=int, default=None,
        help="train on at most this many rows, and validate on as many (default: all)")
    arg("--max_eval_samples", type=int, default=None,
        help="validation rows for the validation loss (default: --max_samples, else all; the real v1 split has "
             "~8,800, a pass over them at every evaluation costs minutes on the 8B)")
    arg("--num_epochs", type=float, default=1.0, help="passes over the training rows (default: %(default)s)")
    arg("--batch_size", type=int, default=4, help="rows per device per step (default: %(default)s)")
    arg("--eval_batch_size", type=int, default=None,
        help="rows per device in validation loss and accuracy scoring; no gradients are kept, so it can be "
             "larger (default: --batch_size)")
    arg("--grad_accum", type=int, default=4, help="gradient accumulation steps (default: %(default)s)")
    arg("--learning_rate", type=float, default=2e-4, help="peak LR, cosine decay, 3%% warmup (default: %(default)s)")
    arg("--lora_r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    arg("--lora_alpha", type=int, default=32, help="LoRA scaling numerator (default: %(default)s)")
    arg("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA path (default: %(default)s)")
    arg("--target_modules", nargs="+", default=["all-linear"],
        help="modules that get LoRA; 'all-linear' = every linear projection but the output head "
             "(q/k/v/o/gate/up/down_proj on Llama) (default: %(default)s)")
    switch = lambda name, default, text: common.add_switch(parser, name, default, text)  # noqa: E731
    switch("load_in_8bit", False, "load the base in 8-bit (bitsandbytes)")
    switch("load_in_4bit", False, "QLoRA: load the base in 4-bit nf4 with double quantization")
    switch("packing", False,
           "padding-free batches: rows are concatenated with per-row position_ids, so no token is padding and no "
           "row attends to another; with flash-attention 2 (--attn_implementation) each row gets its own "
           "variable-length attention. On CPU it is slower than the default dynamic padding. Text models only")
    switch("group_by_length", False, "batch rows of similar length together (less padding)")
    switch("gradient_checkpointing", False, "trade compute for memory (non-reentrant); also under FSDP, whose own "
           "fsdp_activation_checkpointing is refused")
    switch("use_liger_kernel", False,
           "Liger's fused kernels (Trainer's own switch): the fused linear + cross-entropy never materialises the "
           "[tokens, vocab] logits, the largest memory cost of the 8B's loss. Needs a CUDA GPU and "
           "pip install liger-kernel")
    common.add_attn_implementation(parser)
    common.add_precision(parser)
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
    switch("merge", False, "also save merged_model/: the base with the adapter folded in (16-bit bases only)")
    arg("--trust_remote_code", action="store_true", help="allow the model folder to run its own code")
    return parser


def requested_engine():
    """FSDP or DEEPSPEED when `accelerate launch --config_file ...` asked for one (it says so in these
    variables), else None: DDP or a single process."""
    for variable, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(variable, "false").lower() in ("1", "true"):
            return engine
    return None


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    if requested_engine() == "FSDP" and (args.load_in_4bit or args.load_in_8bit):
        raise UsageError("FSDP does not shard 4-bit or 8-bit weights (and bitsandbytes under FSDP2 is unsafe); "
                         "the 8B in 4-bit fits one GPU: use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml")
    fsdp_checkpointing = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("1", "true")
    if requested_engine() == "FSDP" and fsdp_checkpointing:
        # its checkpoint wrapper renames every layer; PEFT 0.21 then matches no adapter key and saves an empty adapter
        raise UsageError("fsdp_activation_checkpointing: true is not supported (PEFT saves an empty adapter from the "
                         "layers it wraps); set it to false in the accelerate config and pass --gradient_checkpointing")
    if requested_engine() and args.merge:  # PEFT: merging under ZeRO-3 folds partitioned weights on rank 0
        raise UsageError(f"--merge is not supported under {requested_engine()}; train without it, then merge on one "
                         "process (QUICKSTART_GUIDE.md, 'Merging a QLoRA adapter')")
    if args.load_in_8bit and args.load_in_4bit:
        raise UsageError("--load_in_8bit and --load_in_4bit are exclusive; pick one (4-bit uses less memory)")
    if args.merge and (args.load_in_8bit or args.load_in_4bit):
        raise UsageError("--merge cannot fold an adapter into a quantized base; train without --merge, then merge "
                         "into the base reloaded in 16-bit (QUICKSTART_GUIDE.md, 'Merging a QLoRA adapter')")
    if args.packing and args.group_by_length:
        raise UsageError("--packing and --group_by_length both fight padding; pick one")
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    for name in ("batch_size", "eval_batch_size", "grad_accum", "eval_steps", "logging_steps", "lora_r"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.max_eval_samples = args.max_eval_samples or args.max_samples
    if args.num_epochs <= 0 or any(n is not None and n < 1 for n in (args.max_samples, args.max_eval_samples)):
        raise UsageError("--num_epochs, --max_samples and --max_eval_samples must be positive")
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
    common.make_output_folder(args.output_dir, "--output_dir")
    return args


def load_processed_dataset(data_path, max_samples, accuracy_samples, columns, max_eval_samples=None):
    """train and validation splits with only the columns the collator reads, and the first accuracy_samples
    validation questions as records for option scoring; clear errors for anything else."""
    hint = f"run: python preprocess_pmc_vqa_for_sft.py --output_dir {data_path}"
    import pyarrow.compute as pc
    from datasets import load_from_disk

    splits = load_from_disk(str(data_path))
    for name, limit in (("train", max_samples), ("validation", max_eval_samples)):
        if name not in splits or "labels" not in splits[name].column_names:
            raise UsageError(f"{data_path} lacks a '{name}' split with labels; {hint}")
        split = splits[name]
        if limit:
            split = split.select(range(min(limit, len(split))))  # contiguous: a slice, no index map
        labels = pc.list_flatten(split.data.column("labels"))  # Arrow: no 50M Python ints for the full train set
        if not len(split) or not pc.any(pc.not_equal(labels, -100)).as_py():
            raise UsageError(f"the {name} split of {data_path} has no trainable tokens; {hint}")
        splits[name] = split
    questions = splits["validation"].select(range(min(accuracy_samples, len(splits["validation"]))))
    questions = questions.select_columns(list(common.QUESTION_COLUMNS)).to_list()
    return splits["train"].select_columns(columns), splits["validation"].select_columns(columns), questions


def pick_precision(choice="auto"):
    """(torch dtype, TrainingArguments kwargs) for --precision on this hardware."""
    import torch

    dtype = common.pick_dtype(choice)
    # use_cpu: without it torchrun on CPU never wraps the model in DDP
    device = {} if torch.cuda.is_available() else {"use_cpu": True}
    mixed = {torch.bfloat16: {"bf16": True}, torch.float16: {"fp16": True}}.get(dtype, {})
    return dtype, {**device, **mixed}


def setup_model(args, dtype, vlm):
    """Base model (optionally 8/4-bit) with LoRA adapters on top; only the adapters train. A vision-language
    model's vision tower and projector get none and stay frozen (and unquantised). (The original pipeline's
    setup_model_and_tokenizer(); the tokenizer now comes with the Prompter.)"""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantized = args.load_in_4bit or args.load_in_8bit
    device_map = None
    if quantized:
        # Quantized weights cannot be moved after loading: place each rank's copy on its own device.
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    model = model_kinds.load_model(args.model_name_or_path, vlm, dtype, args.load_in_4bit,
                                   args.load_in_8bit, device_map, common.attn_implementation(args.attn_implementation),
                                   args.trust_remote_code)
    model.config.use_cache = False  # the KV cache is useless in training and breaks packed attention masks
    if requested_engine() == "FSDP":
        # accelerate's FSDP wraps each class the model lists in _no_split_modules and stops at one it cannot find;
        # CLIP's and SigLIP's lists name their text tower's classes too, which a VLM's vision tower lacks
        present = {type(module).__name__ for module in model.modules()}
        model._no_split_modules = [name for name in model._no_split_modules if name in present]
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph for LoRA
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules if args.target_modules != ["all-linear"] else "all-linear",
                      exclude_modules=model_kinds.lora_exclude(vlm), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def scoring_trainer_class():
    """Trainer whose every evaluation also answers a fixed set of validation questions with the option scorer
    of inference_example.py (one implementation, imported): eval_accuracy and the most-predicted letter's share
    join eval_loss before they are logged and before the best checkpoint is chosen. Neither TRL nor Trainer
    offer accuracy by option scoring during SFT, hence this small subclass. It also saves a full adapter under
    FSDP (see save_model) and checks that every checkpoint holds one.
    """
    from transformers import Trainer, TrainerCallback

    import inference_example

    class AdapterInEveryCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                check_adapter(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    class ScoringTrainer(Trainer):
        def __init__(self, *args, accuracy_questions=(), prompter=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.accuracy_questions, self.prompter = list(accuracy_questions), prompter
            self.accuracy_by_step = {}  # the scoring summary of each evaluation, for the one that becomes final
            self.add_callback(AdapterInEveryCheckpoint())

        def save_model(self, output_dir=None, _internal_call=False):
            """Under FSDP, gather the adapter (the trainable weights alone, never the frozen base) into a full
            state dict and write it as a normal adapter. Trainer writes nothing under FSDP's default
            SHARDED_STATE_DICT, and under it the best checkpoint's folder appears too late for Trainer to record
            it; checkpoints keep their sharded model and optimizer beside this adapter, for resume."""
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            adapter = get_model_state_dict(self.model, options=options)  # a collective: every rank calls it
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=adapter)

        def _get_grad_norm(self, model, grad_norm=None):
            # The global norm, the same on every rank, before the optimizer steps: a NaN stops all ranks alike
            return run_guard.check_finite(super()._get_grad_norm(model, grad_norm), self.state.global_step + 1)

        def evaluate(self, *args, **kwargs):
            try:
                return super().evaluate(*args, **kwargs)
            except run_guard.EvaluationAbandoned:  # a stop signal: this step's checkpoint is saved next, unscored
                return {f"eval_{self.args.metric_for_best_model}": -math.inf if self.args.greater_is_better
                        else math.inf}  # never the best

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            if self.accuracy_questions:
                output.metrics.update(self.score_validation(kwargs.get("metric_key_prefix", "eval")))
            return output

        def score_validation(self, prefix):
            # Every rank scores the same questions in the same order, so every rank agrees on the best
            # checkpoint; under FSDP the ranks' forward passes gather the shards together, batch by batch.
            start = time.time()
            settings = SimpleNamespace(batch_size=self.args.per_device_eval_batch_size)
            summary = inference_example.evaluate(self.model.eval(), self.prompter, self.accuracy_questions, "score",
                                                 settings)
            summary.pop("records")
            self.accuracy_by_step[self.state.global_step] = summary
            seconds = time.time() - start
            if self.is_world_process_zero():
                print(f"step {self.state.global_step}: validation accuracy {summary['accuracy']:.3f} on "
                      f"{summary['n']} questions (most predicted {summary['most_predicted_letter']} "
                      f"{summary['most_predicted_share']:.0%}), scored in {seconds:.1f} s")
            return {f"{prefix}_accuracy": summary["accuracy"],
                    f"{prefix}_most_predicted_share": summary["most_predicted_share"],
                    f"{prefix}_accuracy_seconds": seconds}

    return ScoringTrainer


def training_arguments(args, precision):
    from transformers import TrainingArguments

    quantized = args.load_in_4bit or args.load_in_8bit
    return TrainingArguments(
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
        per_device_eval_batch_size=args.eval_batch_size,
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


def build_trainer(args, model, prompter, train, validation, training_args, accuracy_questions=()):
    from transformers import EarlyStoppingCallback

    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []
    return scoring_trainer_class()(
        model=model, args=training_args, train_dataset=train, eval_dataset=validation,
        data_collator=prompter.collator(args.packing), processing_class=prompter.processor or prompter.tokenizer,
        callbacks=callbacks, accuracy_questions=accuracy_questions, prompter=prompter)


def resolve_checkpoint(resume, output_dir):
    """None, a given checkpoint, or with 'auto' the newest complete one: its trainer_state.json (written last) is
    whole and its adapter loads with finite weights (run_guard.checkpoint_fault)."""
    if resume is None:
        return None
    if resume != "auto":
        fault = run_guard.checkpoint_fault(resume)
        if fault:
            raise UsageError(f"--resume_from_checkpoint {resume} is not a complete checkpoint folder: {fault}; "
                             f"use 'auto' or one of {output_dir}/checkpoint-*")
        return resume
    complete = run_guard.complete_checkpoints(output_dir)
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
        right.axhline(0.25, color="tab:green", linestyle=":", label="chance (4 options)")
        right.set(ylabel="validation accuracy", ylim=(0, 1.05))  # 1.05: an accuracy of 1.0 is not the border
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def check_adapter(folder):
    """A saved adapter must be there and hold weights: a run never ends with an adapter-less folder that looks
    complete (under FSDP with a sharded state dict, Trainer.save_model writes no adapter at all)."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / "adapter_model.safetensors"
    try:
        with safe_open(path, "pt") as weights:
            if any(weights.get_slice(name).get_shape() for name in weights.keys()):
                return
    except (OSError, SafetensorError):  # missing, or not a safetensors file
        pass
    raise SystemExit(f"error: {path} is missing or empty, so {folder} was not kept; the adapter could not be saved "
                     "(an FSDP state-dict setting this script does not handle?); the checkpoints are in place")


def save_final_model(trainer, prompter, args, metrics):
    """final_model/ = adapter + tokenizer (+ a VLM's processor) + README, renamed into place once whole."""
    final, tmp = Path(args.output_dir) / "final_model", Path(args.output_dir) / "final_model.incomplete"
    trainer.save_model(str(tmp))  # every rank calls it (FSDP/DeepSpeed gather); only rank 0 writes
    if not trainer.is_world_process_zero():
        return
    check_adapter(tmp)
    run_guard.match_umask(tmp)
    (prompter.processor or prompter.tokenizer).save_pretrained(tmp)
    flags = " ".join(sys.argv[1:]) or "(defaults)"
    (tmp / "README.md").write_text(
        f"# PMC-VQA LoRA adapter\n\nBase model: {args.model_name_or_path}\nData: {args.data_path}\n"
        f"Command: python train_sft_example.py {flags}\n\nFinal validation loss: {metrics['eval_loss']:.4f} "
        f"(perplexity {metrics['perplexity']:.3f}) after {metrics['steps']} steps.\n\n"
        f"Use: python inference_example.py --model_name_or_path {args.model_name_or_path} --adapter_path {final} "
        f"--data_path {args.data_path}\n(the processed data tells inference how training asked: options shown or "
        "not, reasoning, figures)\n")
    run_guard.replace_folder(tmp, final)
    if args.merge:
        merged, tmp = Path(args.output_dir) / "merged_model", Path(args.output_dir) / "merged_model.incomplete"
        trainer.model.merge_and_unload().save_pretrained(tmp)
        run_guard.match_umask(tmp)
        (prompter.processor or prompter.tokenizer).save_pretrained(tmp)
        run_guard.replace_folder(tmp, merged)


def print_plan(trainer, model, dtype, train_rows, validation_rows, checkpoint):
    """What the run will do, before it does it: what a user checks first on a cluster."""
    run = trainer.args
    trainable, total = model.get_nb_trainable_parameters()
    per_step = run.per_device_train_batch_size * run.gradient_accumulation_steps * run.world_size
    import pyarrow.compute as pc

    mean_tokens = pc.mean(pc.list_value_length(trainer.train_dataset.data.column("input_ids"))).as_py()
    engine = f"{trainer.accelerator.distributed_type.value} on {run.world_size} processes" if run.world_size > 1 \
        else "one process"
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); precision {dtype}; "
          f"{engine}")
    print(f"global batch {run.per_device_train_batch_size} per device x {run.gradient_accumulation_steps} "
          f"accumulation x {run.world_size} processes = {per_step} rows (~{per_step * mean_tokens:,.0f} tokens) per "
          f"optimizer step; {train_rows} train / {validation_rows} validation rows")
    if checkpoint:
        print(f"resuming from {checkpoint}")


def peak_memory_gb():
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_rss_gb": round(rss, 3), "peak_gpu_memory_gb": round(gpu, 3) if gpu is not None else None}


def final_metrics(trainer, result, train_seconds, dtype):
    """What eval_results.json reports. The validation metrics are those of the evaluation whose checkpoint
    became final_model/ (Trainer restores it at the end; tests compare the weights), so it is not run again."""
    state = trainer.state
    evaluations = {entry["step"]: entry for entry in state.log_history if "eval_loss" in entry}
    step = state.best_global_step or max(evaluations, default=None)
    evaluation = evaluations[step] if step is not None else trainer.evaluate()  # a run too short to evaluate
    eval_loss = evaluation["eval_loss"]
    tokens = int(state.num_input_tokens_seen)
    accuracy = trainer.accuracy_by_step.get(step or state.global_step)
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50)),
            "eval_accuracy": evaluation.get("eval_accuracy"),
            "most_predicted_letter": accuracy and accuracy["most_predicted_letter"],
            "most_predicted_share": accuracy and accuracy["most_predicted_share"],
            "collapse_warning": accuracy and accuracy["collapse_warning"],
            "best_model_metric": trainer.args.metric_for_best_model, "best_metric": trainer.state.best_metric,
            "best_step": step,
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
    chosen = f"the checkpoint of step {metrics['best_step']}, the best by {metrics['best_model_metric']} " \
             f"({metrics['best_metric']:.4f})" if metrics["best_metric"] is not None else "the last step"
    print(f"validation loss {metrics['eval_loss']:.4f} (perplexity {metrics['perplexity']:.3f}){accuracy}; "
          f"final_model/ is {chosen}; "
          f"{metrics['steps']} steps, {metrics['tokens_per_second']:.0f} tokens/s")
    if metrics["collapse_warning"]:
        print(f"WARNING: validation answers {metrics['collapse_warning']}")
    print(f"wrote {output}/final_model, eval_results.json, training_summary.json, loss_curve.png")
    print(f"next: python inference_example.py --evaluate --model_name_or_path {args.model_name_or_path} "
          f"--adapter_path {output / 'final_model'} --data_path {args.data_path}")


def main(argv=None):
    args = parse_args(argv)
    prompter = model_kinds.Prompter.from_processed(args.data_path, args.model_name_or_path, args.trust_remote_code)
    train, validation, accuracy_questions = load_processed_dataset(args.data_path, args.max_samples,
                                                                   args.eval_accuracy_samples,
                                                                   prompter.training_columns, args.max_eval_samples)
    guard = run_guard.RunGuard(args.output_dir)  # one run per folder; stop signals; torn checkpoints set aside
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    from transformers import set_seed

    set_seed(args.seed)
    dtype, precision = pick_precision(args.precision)
    # Before the model: the training arguments start accelerate's process group, without which from_pretrained
    # skips ZeRO-3's zero.Init and FSDP's cpu_ram_efficient_loading
    training_args = training_arguments(args, precision)
    model = setup_model(args, dtype, prompter.reads_images)
    trainer = build_trainer(args, model, prompter, train, validation, training_args, accuracy_questions)
    trainer.add_callback(guard.callback(trainer))
    engine = requested_engine()
    if engine and trainer.accelerator.distributed_type.value != engine:  # accelerate turns FSDP on CPU into DDP
        raise UsageError(f"{engine} was asked for, but accelerate set up {trainer.accelerator.distributed_type.value} "
                         "(FSDP and DeepSpeed need GPUs); on CPUs use DDP: torchrun --nproc_per_node N "
                         "train_sft_example.py ...")
    if trainer.is_world_process_zero():
        print_plan(trainer, model, dtype, len(train), len(validation), checkpoint)

    start = time.time()
    with guard.watch(trainer):  # exit 128 + a stop signal, 3 for a full disk, 4 for a non-finite gradient norm
        result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = final_metrics(trainer, result, time.time() - start, dtype)
        save_final_model(trainer, prompter, args, metrics)
        if trainer.is_world_process_zero():
            write_reports(trainer, args, metrics)
    # Under torchrun a process group left to interpreter exit can abort a rank whose work is done ("terminate
    # called without an active exception", exit -6), and the launcher reports the whole run as failed.
    trainer.accelerator.end_training()
    guard.release()
    return trainer


if __name__ == "__main__":
    common.run_main(main)
