"""Generation through a real server: `transformers serve` on 127.0.0.1 serving the merged fine-tune (it cannot
load an adapter folder), one server for the module. Through it, greedy evaluation equals in-process evaluation
record for record; the adapter is really applied; the budget, the samples and the refusals hold; a server
killed mid-run leaves only the missing questions to ask again."""
import json
import subprocess
import sys
import time

import pytest
from conftest import free_port, prompter_for, run_in_process, run_script

import common
import generation
import inference_example as inference
from bench.local_server import serving, stop

# on the worker that runs tests/test_inference.py: its trained adapter (conftest) is merged here, not trained again
pytestmark = pytest.mark.xdist_group("inference")


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter, model_dir):
    """The conftest adapter merged into its base: the folder `transformers serve` loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("merged") / "model"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)  # the adapter's copy: the one training used
    return out


@pytest.fixture(scope="module")
def server(merged):
    with serving(merged, free_port()) as (url, _):
        yield url


def flags(small_processed, *extra):
    return ["--evaluate", "--method", "generate", "--data_path", small_processed, "--num_samples", 8,
            "--max_new_tokens", 24, *extra]


def evaluated(tmp_path, name, *args):
    output = tmp_path / f"{name}.json"
    result = run_in_process(inference.main, *args, "--output_file", output)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    return report, next(iter(report["results"].values()))["records"]


def test_greedy_through_the_server_equals_in_process_and_the_adapter_is_applied(
        tmp_path, server, merged, adapter, model_dir, small_processed):
    served, records = evaluated(tmp_path, "served", *flags(small_processed, "--model_name_or_path", merged,
                                                           "--no_adapter", "--server", server))
    _, in_process = evaluated(tmp_path, "local", *flags(small_processed, "--model_name_or_path", model_dir,
                                                        "--adapter_path", adapter))
    _, base = evaluated(tmp_path, "base", *flags(small_processed, "--model_name_or_path", model_dir, "--no_adapter"))
    assert len(records) == 8 and records == in_process  # text for text, status, tokens, votes
    assert [r["samples"][0]["text"] for r in records] != [r["samples"][0]["text"] for r in base]
    assert served["server"] == server and served["served_model"] == str(merged)
    assert not (tmp_path / "served.partial.jsonl").exists()  # the journal goes once the report is written


def test_a_budget_below_the_answer_gives_no_answer_never_a_letter(tmp_path, server, merged, small_processed):
    _, records = evaluated(tmp_path, "short", *flags(small_processed, "--model_name_or_path", merged, "--no_adapter",
                                                     "--server", server, "--max_new_tokens", 3))
    samples = [s for r in records for s in r["samples"]]
    assert len(samples) == 8 and all(r["predicted"] is None and not r["correct"] for r in records)
    assert all(s["status"] == "no_answer_within_budget" and s["tokens"] == 3 and not s["finished"] for s in samples)


def test_k_samples_give_k_traces_per_question(tmp_path, server, merged, small_processed):
    output = tmp_path / "traces.jsonl"
    result = run_in_process(inference.main, "--generate_traces", "--model_name_or_path", merged, "--no_adapter",
                            "--data_path", small_processed, "--split", "train", "--num_samples", 4,
                            "--num_return_sequences", 3, "--temperature", 0.6, "--max_new_tokens", 16,
                            "--server", server, "--output_file", output)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 12 and len({(t["id"], t["sample"]) for t in lines}) == 12
    assert sorted(t["sample"] for t in lines) == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("extra, words", [
    (["--served_model", "no-such-model"], ["--served_model no-such-model is not among"]),
    (["--server_prompt", "ids"], ["refused the request", "400"]),  # transformers serve takes text prompts only
])
def test_what_the_server_refuses_stops_the_run_at_once_with_nothing_written(
        tmp_path, server, merged, small_processed, extra, words):
    output = tmp_path / "eval.json"
    result = run_in_process(inference.main, *flags(small_processed, "--model_name_or_path", merged, "--no_adapter",
                                                   "--server", server, *extra), "--output_file", output)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert not output.exists()
    journal = tmp_path / "eval.partial.jsonl"
    assert not journal.exists() or len(journal.read_text().splitlines()) == 1  # its header, no record


@pytest.mark.parametrize("extra, words", [
    (["--evaluate", "--no_adapter"], ["--method score through --server"]),
    (["--evaluate", "--method", "generate", "--compare_base"], ["--compare_base through --server"]),
    (["--evaluate", "--method", "generate", "--no_adapter"], ["no model list at", "start the server"]),  # no one
])
def test_what_a_server_cannot_do_is_refused_before_any_request(tmp_path, merged, small_processed, extra, words):
    result = run_in_process(inference.main, *extra, "--model_name_or_path", merged, "--data_path", small_processed,
                            "--server", f"http://127.0.0.1:{free_port()}", "--output_file", tmp_path / "eval.json")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert not list(tmp_path.iterdir())


def test_a_vision_language_model_is_refused_through_a_server(assets):
    result = run_in_process(inference.main, "--question", "Which organ?", "--choices", "A:Liver", "B:Spleen",
                            "--model_name_or_path", assets.vlm, "--no_adapter",
                            "--server", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "text models only" in result.stderr, result.stderr


def test_a_prompt_the_server_counts_differently_stops_the_run(server, merged, small_processed):
    """A second BOS (what a text prompt gets from vLLM) is caught by usage.prompt_tokens, not scored."""
    prompter = prompter_for(small_processed, merged)
    args = inference.parse_args([str(flag) for flag in flags(small_processed, "--model_name_or_path", merged,
                                                             "--no_adapter", "--server", server)])
    client = generation.Server.connect(args, prompter)
    question = inference.load_eval_questions(args)[0]
    assert client.ask(prompter, question, args)[0]["tokens"] > 0
    client.prompt = lambda prompter, question: (prompter.tokenizer.bos_token + prompter.render(
        prompter.format.user_turn(question["question"], question["options"])), len(prompter.prompt_ids(question)))
    with pytest.raises(common.UsageError, match="a second BOS"):
        client.ask(prompter, question, args)


@pytest.mark.slow
def test_traces_and_evaluation_resume_after_the_server_is_killed(tmp_path, merged, small_processed):
    """Both runs against one server, killed once both have written a few records; both rerun against a new one."""
    port, n = free_port(), 24
    common_flags = ["--model_name_or_path", merged, "--no_adapter", "--data_path", small_processed,
                    "--num_samples", n, "--max_new_tokens", 24, "--concurrency", 2, "--retries", 0]
    runs = {"traces": ["--generate_traces", "--split", "train", "--num_return_sequences", 2, "--temperature", 0.6,
                       "--output_file", tmp_path / "traces.jsonl"],
            "evaluation": ["--evaluate", "--method", "generate", "--output_file", tmp_path / "eval.json"]}
    watched = {"traces": tmp_path / "traces.jsonl", "evaluation": tmp_path / "eval.partial.jsonl"}
    with serving(merged, port) as (url, process):
        started = {name: subprocess.Popen([sys.executable, "inference_example.py", *map(str, common_flags + extra),
                                           "--server", url], cwd=inference.__file__.rsplit("/", 1)[0],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for name, extra in runs.items()}
        deadline = time.time() + 120
        while not all(path.exists() and len(path.read_text().splitlines()) >= 4 for path in watched.values()):
            assert time.time() < deadline and all(run.poll() is None for run in started.values())
            time.sleep(0.02)
        stop(process)  # mid-run: the questions in flight and the rest fail
        for run in started.values():
            _, err = run.communicate(timeout=300)
            assert run.returncode == 1 and "got no answer" in err.strip().splitlines()[-1], err[-2000:]
    first = {name: path.read_text().splitlines() for name, path in watched.items()}
    with serving(merged, port) as (url, _):
        second = {name: run_script("inference_example.py", *common_flags, *extra, "--server", url)
                  for name, extra in runs.items()}
    assert all(result.returncode == 0 for result in second.values()), second

    traces = [json.loads(line) for line in watched["traces"].read_text().splitlines()]
    asked = n - len(first["traces"]) // 2
    assert 0 < asked < n and f"generating for {asked}" in second["traces"].stdout  # only the missing ones
    assert len(traces) == 2 * n and len({(t["id"], t["sample"]) for t in traces}) == 2 * n
    assert [json.loads(line) for line in first["traces"]] == traces[:len(first["traces"])]  # kept as they were

    report = json.loads((tmp_path / "eval.json").read_text())["results"]["base/generate"]
    journal = [json.loads(line)["record"] for line in first["evaluation"][1:]]
    assert 0 < len(journal) < n and f"base/generate {len(journal)} questions" in second["evaluation"].stdout
    ids = [r["id"] for r in report["records"]]
    assert len(ids) == len(set(ids)) == n and all(r in report["records"] for r in journal)
