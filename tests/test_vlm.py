"""Vision-language models through the same four scripts, on both tiny families: LLaVA (a SigLIP tower on the
demo's Llama; 16 image tokens) and Qwen2-VL (image_grid_thw, mm_token_type_ids, 3-D mRoPE positions, a token
count that follows the image's size). The invariants of the text path hold with the figure in the prompt."""
import argparse
import json
import shutil

import pytest
from conftest import ROOT, preprocess, prompter_for, run_in_process, run_probe, run_script, v1_row, write_csv

import inference_example as inference
import model_kinds
import test_preprocessing
import train_sft_example as train
from bench.bench_inference import score_options_naive

FAMILIES = ["llava", "qwen2-vl"]
# one xdist worker runs this file, so its shared fixtures are built once (make test: -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("vlm")


@pytest.fixture(scope="session")
def vlm_dirs(assets):
    return {"llava": assets.vlm, "qwen2-vl": assets.qwen_vl}


@pytest.fixture(scope="session")
def vlm_processed(tmp_path_factory, assets, vlm_dirs):
    """The image-only demo set preprocessed for each family (options shown), 24 rows a split at most."""
    folders = {}
    for family, model_dir in vlm_dirs.items():
        folders[family] = tmp_path_factory.mktemp(family) / "data"
        preprocess(assets.image_data, model_dir, folders[family], "--sample_size", 24, "--trust_remote_code")
    return folders


@pytest.fixture(scope="session")
def base_models(vlm_dirs, vlm_processed):
    """(model, prompter, test questions) of each family's base model."""
    loaded = {}
    for family, folder in vlm_dirs.items():
        args = inference.parse_args(["--model_name_or_path", str(folder), "--no_adapter", "--data_path",
                                     str(vlm_processed[family]), "--trust_remote_code", "--max_new_tokens", "8"])
        model, prompter = inference.load_model(args)
        loaded[family] = (model, prompter, inference.load_eval_questions(args), args)
    return loaded


def test_the_model_folder_alone_decides_the_kind(assets):
    assert model_kinds.reads_images(assets.vlm) and model_kinds.reads_images(assets.qwen_vl, trust_remote_code=True)
    assert not model_kinds.reads_images(assets.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_processed_row_keeps_the_invariants_with_its_figure(family, vlm_processed, vlm_dirs):
    from datasets import load_from_disk

    prompter = prompter_for(vlm_processed[family], vlm_dirs[family])
    image_token = prompter.processor.image_token_id
    splits = load_from_disk(str(vlm_processed[family]))
    for split in splits.values():
        for row in split:
            # prompt ids (image tokens included) == what inference feeds; no image token, no prompt token trained
            assert test_preprocessing.check_row(row, prompter) == []
            assert row["prompt"].count(prompter.processor.image_token) == 1 and image_token in row["input_ids"]
    # the training collator: the stored ids, padded; the processor's image inputs; never an image token trained
    rows = splits["train"].select(range(4)).select_columns(prompter.training_columns).to_list()
    batch = prompter.collator(packing=False)(rows)
    assert "pixel_values" in batch and ({"image_grid_thw", "mm_token_type_ids"} <= set(batch)) == (family == "qwen2-vl")
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert prompter.prompt_ids(splits["train"][i]) == row["input_ids"][:row["labels"].count(-100)]
    assert not (batch["labels"] == image_token).any()
    assert ((batch["input_ids"] == image_token).sum(-1) > 0).all()


def figure_set(tmp_path, source_images):
    """A v1 CSV of clean rows on real figures, plus one row of each kind of figure a VLM cannot use."""
    images = tmp_path / "images"
    images.mkdir()
    for i, figure in enumerate(sorted(source_images.iterdir())[:12]):
        shutil.copy(figure, images / f"PMC{i}_F1.png")
    from PIL import Image

    Image.new("RGB", (2000, 5), "white").save(images / "PMC_wide.png")  # aspect ratio 400: Qwen-VL refuses it
    (images / "PMC_empty.png").write_bytes(b"")
    (images / "PMC_corrupt.png").write_bytes(b"GIF89a but not really")
    rows = [v1_row(i) for i in range(12)]
    rows += [v1_row(20, figure="PMC_wide.png"), v1_row(21, figure="PMC_empty.png"),
             v1_row(22, figure="PMC_corrupt.png"), v1_row(23, figure="PMC_missing.png"),
             v1_row(24, figure="PMC3_F1.png")]
    rows[-1][1] = " Is the <image> or the <|image_pad|> token here? "  # the model's own placeholder text
    return write_csv(tmp_path / "train.csv", rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_figures_a_vlm_cannot_use_are_dropped_and_counted(tmp_path, assets, vlm_dirs, family):
    csv_file = figure_set(tmp_path, assets.image_data / "images")
    _, stats = preprocess(csv_file, vlm_dirs[family], tmp_path / "out", "--trust_remote_code", "--val_ratio", 0.2)
    expected = {"image_empty": 1, "image_unreadable": 1, "image_missing": 1, "image_placeholder_in_text": 1}
    if family == "qwen2-vl":
        expected["image_aspect_ratio_unsupported"] = 1  # LLaVA resizes any shape to 32x32
    assert stats["rows_dropped"] == expected
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["rows_dropped"].values()) == 17
    assert stats["config"]["reads_images"] and stats["config"]["image_root"] == str((tmp_path / "images").resolve())
    # a text model reads no figure: the same file keeps every row
    _, text_stats = preprocess(csv_file, assets.model, tmp_path / "text", "--val_ratio", 0.2)
    assert text_stats["rows_kept"] == 17 and not text_stats["config"]["reads_images"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_4bit_touch_the_language_model_only(family, vlm_dirs, vlm_processed):
    import bitsandbytes as bnb
    import torch

    args = train.parse_args(["--model_name_or_path", str(vlm_dirs[family]), "--data_path",
                             str(vlm_processed[family]), "--trust_remote_code", "--load_in_4bit"])
    model = train.setup_model(args, torch.float32, vlm=True)
    language_linears = [name for name, module in model.named_modules()
                        if "language_model" in name and isinstance(module, bnb.nn.Linear4bit)]
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    layers = model.get_base_model().config.text_config.num_hidden_layers
    assert len(language_linears) == len(adapted) == 7 * layers  # q k v o gate up down in every layer
    assert all("language_model" in name for name in adapted)
    vision = [module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
              and any(part in name for part in ("vision_tower", "multi_modal_projector", "visual"))]
    assert vision and not any(isinstance(module, bnb.nn.Linear4bit) for module in vision)  # kept in 16 bit
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)  # vision tower and projector frozen


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_scores_equal_full_rows_and_batches_change_nothing(family, base_models):
    model, prompter, questions, args = base_models[family]
    batch = questions[:5]
    shared = inference.score_options(model, prompter, batch)  # each figure encoded once, its cache reused
    naive = score_options_naive(model, prompter, batch)        # the figure encoded again with every option
    for new, old in zip(shared, naive):
        assert new["option_scores"] == pytest.approx(old["option_scores"], abs=1e-4)
    for method in (inference.score_options, inference.score_letters):
        together = method(model, prompter, batch)
        alone = [method(model, prompter, [q])[0] for q in batch]
        for a, b in zip(together, alone):
            assert a["option_scores"] == pytest.approx(b["option_scores"], abs=1e-4)
    batched = inference.generate_answers(model, prompter, batch, args)
    assert batched == [inference.generate_answers(model, prompter, [q], args)[0] for q in batch]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_blank_figure_changes_what_the_model_sees(family, base_models):
    model, prompter, questions, _ = base_models[family]
    real = inference.score_options(model, prompter, questions[:3])
    blank = inference.score_options(model, prompter.replaced(image_control="blank"), questions[:3])
    assert any(a["option_scores"] != pytest.approx(b["option_scores"], abs=1e-4) for a, b in zip(real, blank))
    image = prompter.replaced(image_control="blank").image(questions[0])
    assert image.size == prompter.image(questions[0]).size and image.getextrema() == ((0, 0),) * 3


def test_the_blank_figure_report_rows_score_blank_figures(base_models):
    model, prompter, questions, args = base_models["llava"]
    settings = argparse.Namespace(**{**vars(args), "image_control": "blank", "method": "score"})
    report = inference.evaluate_all(model, prompter, questions[:4], settings)
    blank = inference.score_options(model, prompter.replaced(image_control="blank"), questions[:4])
    real, controlled = (report["results"][name]["records"] for name in ("base/score", "base/blank_image/score"))
    for record, expected in zip(controlled, blank):
        assert record["option_scores"] == pytest.approx(expected["option_scores"], abs=1e-4)
    assert any(a["option_scores"] != pytest.approx(b["option_scores"], abs=1e-4) for a, b in zip(real, controlled))
    assert "base/score - base/blank_image/score" in report["paired"]


def test_max_pixels_caps_the_image_tokens_of_a_pixel_budget_processor(tmp_path, vlm_dirs, vlm_processed):
    from PIL import Image

    figure, budget = Image.new("RGB", (1000, 800), "white"), 256 * 28 * 28

    def image_tokens(prompter):
        ids = prompter.encode(prompter.render("Q?"), figure)["input_ids"]
        return int((ids == prompter.processor.image_token_id).sum())

    uncapped = image_tokens(model_kinds.Prompter.for_model(vlm_dirs["qwen2-vl"], trust_remote_code=True))
    capped = image_tokens(model_kinds.Prompter.for_model(vlm_dirs["qwen2-vl"], trust_remote_code=True,
                                                         max_pixels=budget))
    assert capped * 28 * 28 <= budget < uncapped * 28 * 28  # one token per 28x28 pixels after the merge
    # training and inference read the cap from the processed data's config
    data = tmp_path / "data"
    shutil.copytree(vlm_processed["qwen2-vl"], data)
    stats = json.loads((data / "preprocessing_stats.json").read_text())
    stats["config"]["max_pixels"] = budget
    (data / "preprocessing_stats.json").write_text(json.dumps(stats))
    assert image_tokens(prompter_for(data, vlm_dirs["qwen2-vl"])) == capped


def test_the_vlm_collator_pads_labels_that_are_never_trained(vlm_processed, vlm_dirs):
    from datasets import load_from_disk

    prompter = prompter_for(vlm_processed["llava"], vlm_dirs["llava"])
    split = load_from_disk(str(vlm_processed["llava"]))["train"]
    rows = split.select(range(6)).select_columns(prompter.training_columns).to_list()
    assert len({len(row["input_ids"]) for row in rows}) > 1  # rows of different lengths, so padding happens
    batch = prompter.collator(packing=False)(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()


def test_the_self_check_takes_the_vlm_preprocessing_recipe(assets, monkeypatch):
    """test_preprocessing.py accepts the flags of preprocessing's VLM recipe (--max_pixels) and checks rows made with
    them: the recipe runs as QUICKSTART_GUIDE.md shows it, and a smaller cap prints fewer image tokens."""
    monkeypatch.chdir(ROOT)  # the recipe path is relative to the repository root, as in the guide
    image_tokens = {}
    for cap in ("@configs/qwen2.5-vl-7b/preprocess.args", "--max_pixels=784"):  # 784 = one 28 x 28 image token
        result = run_in_process(test_preprocessing.main, "--data_path", assets.image_data, "--model_name_or_path",
                                assets.qwen_vl, "--trust_remote_code", "--num_rows", 1, cap)
        assert result.returncode == 0 and "every invariant holds" in result.stdout, result.stderr
        image_tokens[cap] = result.stdout.count("<|image_pad|>")
    assert image_tokens == {"@configs/qwen2.5-vl-7b/preprocess.args": 4, "--max_pixels=784": 1}  # 1 example printed


def test_packing_is_refused_for_a_vlm(vlm_processed, vlm_dirs):
    prompter = prompter_for(vlm_processed["llava"], vlm_dirs["llava"])
    with pytest.raises(model_kinds.UsageError, match="--packing is for text models"):
        prompter.collator(packing=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_and_evaluate_a_vlm_end_to_end(tmp_path, family, vlm_dirs, vlm_processed):
    model_dir, data = vlm_dirs[family], vlm_processed[family]
    out = tmp_path / "sft"
    train_flags = ["--data_path", data, "--model_name_or_path", model_dir, "--max_samples", 16, "--batch_size", 4,
                   "--grad_accum", 1, "--learning_rate", 3e-3, "--eval_steps", 2, "--eval_accuracy_samples", 8,
                   "--trust_remote_code"]
    whole = run_probe(tmp_path / "probe", [*train_flags, "--output_dir", out])[0]
    assert whole["steps"] == [0, 1, 2, 3] and (out / "final_model" / "processor_config.json").exists()
    if family == "llava":  # resume from the first checkpoint, as a killed run would: the same final adapter
        cut = tmp_path / "cut"
        cut.mkdir()
        shutil.copytree(out / "checkpoint-2", cut / "checkpoint-2")
        resumed = run_probe(tmp_path / "resumed", [*train_flags, "--output_dir", cut, "--resume_from_checkpoint",
                                                   "auto"])[0]
        assert resumed["steps"] == [2, 3] and resumed["lora"] == pytest.approx(whole["lora"], abs=1e-6)

    report_path = tmp_path / "eval.json"
    result = run_script("inference_example.py", "--evaluate", "--method", "all", "--compare_base", "--image_control",
                        "blank", "--num_samples", 6, "--max_new_tokens", 8, "--model_name_or_path", model_dir,
                        "--adapter_path", out / "final_model", "--data_path", data, "--output_file", report_path,
                        "--trust_remote_code")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["reads_images"] is True
    assert set(report["results"]) == {f"{model}/{figure}{method}" for model in ("fine_tuned", "base")
                                      for figure in ("", "blank_image/") for method in ("score", "letter", "generate")}
    for name, r in report["results"].items():
        assert r["n"] == 6 and all(record["figure_path"] for record in r["records"])
    assert "fine_tuned/score - fine_tuned/blank_image/score" in report["paired"]
    assert "fine_tuned/score - base/score" in report["paired"]
    assert "fine_tuned/blank_image/score" in result.stdout
