"""The embedded default: deterministic data, a tokenizer that renders DeepSeek-R1's format, a loadable model."""
import csv

import build_demo_assets as bda

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def test_same_seed_gives_byte_identical_csvs_and_tokenizer_ids(tmp_path):
    for run in ("a", "b"):
        bda.build_data(tmp_path / run, seed=7, num_train=300)
        bda.build_tokenizer(tmp_path / run / "tok", tmp_path / run)
    for name in ("train.csv", "test.csv", "test_clean.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "tok" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tok" / "tokenizer.json").read_bytes()
    other = tmp_path / "c"
    bda.build_data(other, seed=8, num_train=300)
    assert (other / "train.csv").read_bytes() != (tmp_path / "a" / "train.csv").read_bytes()


def test_synthetic_csv_has_the_real_v1_schema_and_a_flat_letter_prior(data_dir):
    with open(data_dir / "train.csv", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert next(reader) == bda.V1_COLUMNS
        rows = list(reader)
    assert len(rows) >= 2000
    assert rows[0][3].startswith(" A:") and rows[0][3].endswith(" ")  # ' A:text ' as in the download
    letters = [row[7] for row in rows]
    for letter in "ABCD":
        assert 0.2 < letters.count(letter) / len(rows) < 0.3
    assert all((data_dir / "images" / row[0]).exists() for row in rows[:50])
    for name in ("test.csv", "test_clean.csv"):
        assert sum(1 for _ in open(data_dir / name, encoding="utf-8")) - 1 >= 200


def test_template_renders_the_r1_format_exactly(tokenizer):
    user = [{"role": "user", "content": "What is shown?"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        f"{BOS}<｜User｜>What is shown?<｜Assistant｜><think>\n"
    turn = user + [{"role": "assistant", "content": "<think>\nlong reasoning\n</think>\n\nAnswer: B"}]
    rendered = tokenizer.apply_chat_template(turn, tokenize=False)
    # The real template keeps only what follows </think> in assistant turns: reasoning is deleted.
    assert rendered == f"{BOS}<｜User｜>What is shown?<｜Assistant｜>\n\nAnswer: B{EOS}"
    with_system = [{"role": "system", "content": "SYS"}] + user
    assert tokenizer.apply_chat_template(with_system, tokenize=False).startswith(f"{BOS}SYS<｜User｜>")
    assert rendered.count(BOS) == 1


def test_pad_differs_from_eos_and_bos_behaves_like_llama(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id           # like the real tokenizer
    assert tokenizer.bos_token_id not in tokenizer("x", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("<think>", add_special_tokens=False)["input_ids"]) == 1


def test_tiny_model_round_trips_through_save_and_load(tmp_path, model_dir):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, LlamaForCausalLM)  # the 8B's architecture class
    model.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
