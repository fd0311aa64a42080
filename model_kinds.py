"""Text model or vision-language model (VLM): decided once, from the model folder, and kept in this file.

A model folder whose config holds a vision_config is a VLM: it loads with AutoModelForImageTextToText and
AutoProcessor, and its prompt is the model's own chat template applied to one user turn holding one image
part and the same text a text model gets. Anything else is a causal LM with its tokenizer. The scripts ask
one Prompter for a question's model inputs and load_model() for the model, and never ask which kind it is.

What differs between VLM families (the image placeholder, how many tokens an image becomes, extra inputs
such as Qwen's image_grid_thw and mm_token_type_ids) is the processor's business: the Prompter passes its
output through whole. The one family difference the processor does not cover, Qwen's 3-D (mRoPE) positions,
is in prompt_positions().
"""
import copy
from pathlib import Path

import common
from common import UsageError

# peft's all-linear adds adapters to the vision tower and projector of every VLM family: LoRA goes on the
# language model only. These names cover LLaVA, Qwen2/2.5-VL, Idefics3/SmolVLM, Gemma-3 and PaliGemma.
VISION_MODULES = r".*(visual|vision_tower|vision_model|multi_modal_projector|connector).*"
# bitsandbytes matches a skip name from the start of the module path (or as a suffix), hence the regexes:
# the vision tower and projector stay unquantised, like the output head.
NOT_QUANTIZED = [r".*visual", r".*vision_tower", r".*vision_model", r".*multi_modal_projector", r".*connector",
                 "lm_head"]
# Inputs with one value per token: padded beside input_ids (with these values); all other processor
# outputs (pixel_values, image_grid_thw, ...) are per image and concatenated.
TOKEN_ALIGNED = {"input_ids": None, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0,
                 "token_type_ids": 0}
BLANK = (0, 0, 0)  # --image_control blank: a black figure of the same size (MedVInT's "black image" control)


def reads_images(model_name_or_path, trust_remote_code=False):
    """Is the model at this path a VLM (its config has a vision_config)?"""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a model config from {model_name_or_path!r} ({str(err).splitlines()[0]}); "
                         "pass --model_name_or_path with a local model folder or set MODEL_PATH in common.py")
    return getattr(config, "vision_config", None) is not None


def load_processing(path, vlm, trust_remote_code=False):
    """(tokenizer, processor or None) of a model folder, with one-line errors for what a user can fix."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code) if vlm else None
        tokenizer = processor.tokenizer if vlm else AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code)
    except ImportError as err:  # transformers 5.x: the Qwen-VL processors need torchvision for their video half
        raise UsageError(f"cannot load the processor of {path!r} ({str(err).splitlines()[0]}); pip install "
                         "torchvision==0.28.0, the release for torch 2.13.0, from your torch's index "
                         "(QUICKSTART_GUIDE.md, 'Vision-language models')")
    except (OSError, ValueError, AttributeError) as err:
        hint = "add --trust_remote_code if you trust its code" if "trust_remote_code" in str(err) else \
            "pass --model_name_or_path with a local model folder or set MODEL_PATH in common.py"
        raise UsageError(f"cannot load the tokenizer or processor of {path!r} ({str(err).splitlines()[0]}); {hint}")
    if vlm and not hasattr(processor, "image_processor"):
        raise UsageError(f"{path!r} has a vision config but no image processor (processor_config.json); use the "
                         "model folder as published")
    if not (processor or tokenizer).chat_template:
        raise UsageError(f"the tokenizer of {path!r} has no chat template; use a chat model such as "
                         "deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    if tokenizer.pad_token is None:  # batches need one; labels never depend on it (they mask by prompt length)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, processor


def set_max_pixels(processor, max_pixels):
    """Cap the pixels of a processor that resizes to a pixel budget (Qwen-VL: size has shortest_edge = min
    pixels and longest_edge = max pixels); a fixed-size processor (LLaVA, 32x32 in the demo) has no cap."""
    size = dict(processor.image_processor.size)
    if set(size) != {"shortest_edge", "longest_edge"}:
        raise UsageError(f"--max_pixels applies to processors that resize to a pixel budget (Qwen-VL); "
                         f"{type(processor.image_processor).__name__} resizes to {size}: drop --max_pixels")
    processor.image_processor.size = {"shortest_edge": min(size["shortest_edge"], max_pixels),
                                      "longest_edge": max_pixels}


def open_image(path):
    """(RGB image, '') or (None, drop reason): the reasons preprocessing counts."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return None, "image_missing"
    if path.stat().st_size == 0:
        return None, "image_empty"
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")  # decodes the whole file: a truncated one fails here, not in training
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, "image_unreadable"
    return (None, "image_empty") if min(image.size) == 0 else (image, "")


class Prompter:
    """How every script asks a question: the prompt format, the model's chat template, and for a VLM the
    figure. A training row's prompt ids are, token for token, what inference feeds the model (tested)."""

    def __init__(self, tokenizer, prompt_format, processor=None, image_root=None, image_control=None):
        self.tokenizer, self.format, self.processor = tokenizer, prompt_format, processor
        self.image_root = Path(image_root) if image_root else None
        self.image_control = image_control

    @classmethod
    def for_model(cls, model_name_or_path, include_choices=True, add_reasoning=False, trust_remote_code=False,
                  image_root=None, max_pixels=None):
        """The prompter preprocessing builds for a model: the format follows its template (see opens_think)."""
        vlm = reads_images(model_name_or_path, trust_remote_code)
        tokenizer, processor = load_processing(model_name_or_path, vlm, trust_remote_code)
        if max_pixels and vlm:
            set_max_pixels(processor, max_pixels)
        prompter = cls(tokenizer, common.PromptFormat(include_choices, add_reasoning), processor, image_root)
        prompter.format = common.PromptFormat(include_choices, add_reasoning, prompter.opens_think())
        return prompter

    @classmethod
    def from_processed(cls, data_path, model_name_or_path, trust_remote_code=False, image_control=None,
                       processing_path=None):
        """The prompter a processed dataset was built with, checked against this model: training and inference
        ask exactly as preprocessing did. processing_path: where the tokenizer or processor is (an adapter
        folder saves its own copy), default the model."""
        config = common.read_processed_config(data_path)
        vlm = reads_images(model_name_or_path, trust_remote_code)
        if config.get("reads_images", False) != vlm:
            kinds = {True: "a vision-language model", False: "a text model"}
            raise UsageError(f"{data_path} was preprocessed for {kinds[config.get('reads_images', False)]} and "
                             f"{model_name_or_path} is {kinds[vlm]}; preprocess again with this model")
        tokenizer, processor = load_processing(processing_path or model_name_or_path, vlm, trust_remote_code)
        if config.get("max_pixels") and vlm:
            set_max_pixels(processor, config["max_pixels"])
        prompter = cls(tokenizer, None, processor, config.get("image_root"), image_control)
        prompter.format = common.PromptFormat(config["include_choices"], config["add_reasoning"],
                                              prompter.opens_think())
        if config.get("thinks", prompter.format.thinks) != prompter.format.thinks:
            opens = "opens" if config["thinks"] else "does not open"
            raise UsageError(f"{data_path} was preprocessed for a template that {opens} a <think> block and this "
                             "model's does not match; preprocess again with this model")
        return prompter

    @property
    def reads_images(self):
        return self.processor is not None

    def replaced(self, **changes):
        """A copy asking differently (another format, a blank image control); the loaded processor is shared."""
        prompter = copy.copy(self)
        prompter.__dict__.update(changes)
        return prompter

    def render(self, user_text):
        """The exact prompt text: the chat template applied to one user turn, with the generation prompt.
        For R1 it ends '<｜Assistant｜><think>\\n' and already holds bos (so it is tokenized without adding one)."""
        content = [{"type": "image"}, {"type": "text", "text": user_text}] if self.reads_images else user_text
        return (self.processor or self.tokenizer).apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def opens_think(self):
        """Does the generation prompt open a reasoning block (R1: it ends '<think>\\n')? Decided from the
        rendered template, not from the model's name, so any chat model gets the right completion shape."""
        return self.render("?").rstrip().endswith("<think>")

    def image(self, question):
        """A question's figure: the image it carries (--image) or the file at its figure_path; a black one of
        the same size under --image_control blank."""
        from PIL import Image

        image = question.get("image")
        if image is None:
            image, why = open_image(self.image_root / question["figure_path"])
            if image is None:
                raise UsageError(f"{self.image_root / question['figure_path']}: {why.replace('_', ' ')}; "
                                 "preprocessing checked it, so the image folder changed since: preprocess again")
        return Image.new("RGB", image.size, BLANK) if self.image_control == "blank" else image

    def encode(self, prompt, image=None):
        """Model inputs (batch of one, tensors) for rendered prompt text and, for a VLM, its image."""
        if not self.reads_images:
            return dict(self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt"))
        return dict(self.processor(text=[prompt], images=[image], add_special_tokens=False, return_tensors="pt"))

    def question_inputs(self, question):
        """Model inputs for a question dict (question, options, and figure_path for a VLM)."""
        prompt = self.render(self.format.user_turn(question["question"], question["options"]))
        return self.encode(prompt, self.image(question) if self.reads_images else None)

    def prompt_ids(self, question):
        """The ids a question's prompt (figure included) becomes: the same in training and inference."""
        return self.question_inputs(question)["input_ids"][0].tolist()

    def encode_prompts(self, user_texts, figure_paths):
        """Preprocessing: (rendered prompts, their ids, drop reasons; '' = keep). A text model tokenizes the
        whole batch at once; a VLM opens every figure, and a row whose figure cannot be used is dropped."""
        prompts = [self.render(text) for text in user_texts]
        if not self.reads_images:
            return prompts, self.tokenizer(prompts, add_special_tokens=False)["input_ids"], [""] * len(prompts)
        placeholders = [token for token in (getattr(self.processor, "image_token", None),
                                            getattr(self.processor, "video_token", None)) if token]
        ids, reasons = [], []
        for text, prompt, figure in zip(user_texts, prompts, figure_paths):
            image, why = open_image(self.image_root / figure)
            if not why and any(token in text for token in placeholders):
                why = "image_placeholder_in_text"  # it would become a second, imageless image slot
            if not why:
                try:
                    ids.append(self.encode(prompt, image)["input_ids"][0].tolist())
                except ValueError as err:  # Qwen-VL: "absolute aspect ratio must be smaller than 200"
                    if "aspect ratio" not in str(err):
                        raise
                    why = "image_aspect_ratio_unsupported"
            if why:
                ids.append([])
            reasons.append(why)
        return prompts, ids, reasons

    def completion_ids(self, letter, options, reasoning=None):
        """The completion's ids, eos included: appended as text after the prompt, never through the template."""
        text = self.format.completion(letter, options, reasoning)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    @property
    def training_columns(self):
        """What the training collator reads from a processed row (a VLM's collator renders its figure)."""
        return ["input_ids", "attention_mask", "labels"] + (["prompt", "figure_path"] if self.reads_images else [])

    def collator(self, packing):
        """Training batches: padded rows (DataCollatorForSeq2Seq), padding-free packed rows, or a VLM's."""
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        if packing and self.reads_images:
            raise UsageError("--packing is for text models: a VLM's image features and Qwen's 3-D positions break "
                             "under naive packing; drop --packing (--group_by_length also cuts padding)")
        if packing:  # one row of concatenated sequences + per-sequence position_ids
            return DataCollatorWithFlattening()
        if self.reads_images:
            return FigureCollator(self)
        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)

    def batch(self, features, side, device=None):
        """Pad per-token inputs (on the left for inference, the right for training) and concatenate per-image
        ones: the same code for a text model's input_ids and a VLM's pixel_values and image_grid_thw."""
        import torch

        width = max(f["input_ids"].shape[-1] for f in features)
        out = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key not in TOKEN_ALIGNED:
                out[key] = torch.cat(values)
                continue
            fill = self.tokenizer.pad_token_id if key == "input_ids" else TOKEN_ALIGNED[key]
            padded = torch.full((len(values), width), fill, dtype=values[0].dtype)
            for i, value in enumerate(values):
                n = value.shape[-1]
                if side == "left":
                    padded[i, width - n:] = value[0]
                else:
                    padded[i, :n] = value[0]
            out[key] = padded
        return {key: value.to(device) for key, value in out.items()} if device is not None else out


def extended(features, ids):
    """Inputs of a prompt followed by more text tokens (ids): text tokens are never image tokens."""
    import torch

    tail = torch.tensor([ids], dtype=features["input_ids"].dtype)
    return {key: torch.cat([value, tail if key == "input_ids" else torch.full_like(tail, 1 if key == "attention_mask"
                                                                                    else TOKEN_ALIGNED[key])], -1)
            if key in TOKEN_ALIGNED else value for key, value in features.items()}


class FigureCollator:
    """Training batches for a VLM. The ids preprocessing stored are padded as for a text model; the processor
    runs here, per batch, on each row's prompt and figure (pixels never go on disk: ~24 MB per PMC figure).
    Written by hand because no library collator takes pre-tokenized completions with the labels we chose
    (TRL's VLM collator re-tokenizes and leaves image tokens in the labels)."""

    def __init__(self, prompter):
        self.prompter = prompter

    def __call__(self, rows):
        import torch

        features = []
        for row in rows:
            prompt = self.prompter.encode(row["prompt"], self.prompter.image(row))
            n = prompt["input_ids"].shape[-1]
            if prompt["input_ids"][0].tolist() != row["input_ids"][:n]:
                raise UsageError("this processor turns a prompt into other ids than preprocessing did (another "
                                 "model, processor version or --max_pixels?); preprocess again with this model")
            row_inputs = extended(prompt, row["input_ids"][n:])
            row_inputs["labels"] = torch.tensor([row["labels"]])
            features.append(row_inputs)
        return self.prompter.batch(features, side="right")


def prompt_positions(model, inputs):
    """(position ids of a left-padded prompt batch, each row's next position). Positions count real tokens
    only, as in training. Qwen-VL's are 3-D (mRoPE: an image token has time, height and width positions),
    computed by the model's own get_rope_index; a text token after the image has all three equal."""
    mask = inputs["attention_mask"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rope_index = getattr(getattr(base, "model", None), "get_rope_index", None)
    if rope_index is None or "image_grid_thw" not in inputs:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return positions, mask.sum(-1)
    positions, deltas = rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                   image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    return positions, mask.sum(-1) + deltas[:, 0]


def load_model(model_name_or_path, vlm, dtype, load_in_4bit=False, load_in_8bit=False, device_map=None,
               attn_implementation=None, trust_remote_code=False):
    """The base model in its kind's auto class; quantised, a VLM keeps its vision tower and projector in 16 bit."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    quantization = common.quantization_config(load_in_4bit, load_in_8bit, dtype, NOT_QUANTIZED if vlm else None)
    return auto.from_pretrained(model_name_or_path, dtype=dtype, device_map=device_map,
                                quantization_config=quantization, attn_implementation=attn_implementation,
                                trust_remote_code=trust_remote_code)


def lora_exclude(vlm):
    """LoRA's exclude_modules: a VLM's vision side; nothing for a text model (peft warns if nothing matched)."""
    return VISION_MODULES if vlm else None
