"""The format is a contract, pinned in exact strings and ids for three chat templates: the demo's tiny R1
tokenizer, the real DeepSeek-R1-Distill-Llama-8B template (tests/fixtures), and SmolLM2's ChatML. The think
block is closed only where the template's generation prompt opened one; for each template the prompt ids a
training row starts with are the ids inference feeds the model."""
import shutil

import pytest
from conftest import ROOT, preprocess, prompter_for

import common
import model_kinds
import test_preprocessing

QUESTION, OPTIONS = " Which organ is marked? ", ["Liver", "Spleen", "Kidney", "Lung"]
USER = ("Which organ is marked?\nOptions:\nA: Liver\nB: Spleen\nC: Kidney\nD: Lung\n"
        'Give your final answer on the last line as "Answer: <letter>. <option text>".')
R1_PROMPT = f"<｜begin▁of▁sentence｜><｜User｜>{USER}<｜Assistant｜><think>\n"
CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def r1_8b_dir(tmp_path_factory, model_dir):
    """The demo model folder with the real 8B's chat template in place of the demo's own."""
    folder = tmp_path_factory.mktemp("r1-8b-template") / "model"
    shutil.copytree(model_dir, folder)
    shutil.copy(ROOT / "tests" / "fixtures" / "deepseek_r1_distill_llama_8b.jinja", folder / "chat_template.jinja")
    return folder


def check_template(model_folder, tmp_path, prompt, completion, thinks):
    prompter = model_kinds.Prompter.for_model(model_folder)
    tokenizer, prompt_format = prompter.tokenizer, prompter.format
    assert prompt_format.thinks == thinks
    assert prompter.render(prompt_format.user_turn(QUESTION, OPTIONS)) == prompt
    assert prompt_format.completion("B", OPTIONS) == completion
    assert prompt_format.parse(completion, OPTIONS) == "B"
    assert prompter.prompt_ids({"question": QUESTION, "options": OPTIONS}) == tokenizer(
        prompt, add_special_tokens=False)["input_ids"]
    splits, _ = preprocess(ROOT / "demo_assets" / "PMC-VQA", model_folder, tmp_path / "p", "--sample_size", 8)
    reread = prompter_for(tmp_path / "p", model_folder)
    assert reread.format == prompt_format
    for split in splits.values():
        for row in split:
            assert test_preprocessing.check_row(row, reread) == []
            ids = reread.prompt_ids(row)  # what inference feeds
            assert row["input_ids"][:len(ids)] == ids and row["labels"][:len(ids)] == [-100] * len(ids)
            # what option scoring appends to the prompt is what training taught, eos included
            assert reread.completion_ids(row["answer_label"], row["options"]) == row["input_ids"][len(ids):]
            assert row["input_ids"][-1] == row["labels"][-1] == tokenizer.eos_token_id
    return tokenizer


def test_demo_r1_tokenizer(model_dir, tmp_path):
    tokenizer = check_template(model_dir, tmp_path, R1_PROMPT, "\n</think>\n\nAnswer: B. Spleen", thinks=True)
    assert tokenizer(R1_PROMPT, add_special_tokens=False)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_real_deepseek_r1_distill_llama_8b_template(r1_8b_dir, tmp_path):
    tokenizer = check_template(r1_8b_dir, tmp_path, R1_PROMPT, "\n</think>\n\nAnswer: B. Spleen", thinks=True)
    # Its trap, the reason completions are appended as text: rendered as an assistant turn, the reasoning
    # before </think> is deleted.
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "Q"},
                                          {"role": "assistant", "content": "I reason.\n</think>\n\nAnswer: B"}],
                                         tokenize=False)
    assert "I reason." not in turn and turn.endswith("<｜Assistant｜>\n\nAnswer: B<｜end▁of▁sentence｜>")


@pytest.mark.slow
def test_smollm2_chatml_template(real_model_dir, tmp_path):
    tokenizer = check_template(real_model_dir, tmp_path, CHATML_PROMPT, "Answer: B. Spleen", thinks=False)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # labels must not come from input_ids != pad
    with_reasoning = model_kinds.Prompter.for_model(real_model_dir, add_reasoning=True).format
    assert with_reasoning.completion("B", OPTIONS) == "The findings point to Spleen.\n\nAnswer: B. Spleen"


def test_a_dataset_processed_for_another_template_is_refused(r1_8b_dir, tmp_path, model_dir):
    preprocess(ROOT / "demo_assets" / "PMC-VQA", r1_8b_dir, tmp_path / "p", "--sample_size", 4)
    assert common.read_processed_config(tmp_path / "p")["thinks"] is True
    other = tmp_path / "no-think"  # a template whose generation prompt opens no think block
    shutil.copytree(model_dir, other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(common.UsageError, match="preprocess again with this model"):
        prompter_for(tmp_path / "p", other)
