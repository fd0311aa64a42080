"""Where inference_example.py's generated answers come from: the loaded model's generate() in this process, or a
serving engine's OpenAI-compatible /v1/completions (vLLM, SGLang, `transformers serve`) with --server.

Both give, for each question, its --num_return_sequences samples as {"text", "tokens", "finished"}: the text
after the prompt with special tokens skipped, the tokens generated (eos included), and whether the model
stopped by itself within --max_new_tokens. Parsing, votes, the thinking-budget accounting, the report and the
traces are inference_example.py's and never ask which one answered (engine() is the one place that picks).

Through a server (QUICKSTART_GUIDE.md, "Evaluation at scale"):
  - the prompt is the kit's own, exactly as in training, never the server's chat template: token ids for vLLM
    and SGLang (a text prompt there gets a second BOS: they add one to a prompt that already starts with it),
    text for `transformers serve` (it takes strings only and adds the BOS itself, so the BOS text is cut off
    the front). --server_prompt auto reads which from /v1/models' owned_by; every response's
    usage.prompt_tokens must equal the kit's prompt length, or the run stops: a double BOS, a re-templated
    prompt or another tokenizer all fail that check.
  - every request says max_tokens (the servers' default is 16) and its sampling settings (vLLM otherwise takes
    the model's generation_config.json: R1 samples at 0.6), one request per sample with a seed derived from the
    question id and the sample index, so a resumed question redraws the same samples where the server
    honours seeds (vLLM, SGLang; `transformers serve` seeds one global generator, not reproducible under
    concurrency). `transformers serve` keeps a greedy model greedy whatever the temperature unless the request
    carries its own generation_config with do_sample, so it gets that field (it answers 422 to vLLM's extras).
  - connection errors, timeouts, 429 and 5xx are retried with exponential backoff; any other 4xx (a model
    name, a field the server rejects) stops the run at once. The client library never retries on its own
    (max_retries=0): it would resend a long generation that timed out. A question still failing is left
    unanswered: never scored, never written as an empty answer; the run finishes the others and exits 1, and
    the same command again asks only for the questions missing.
"""
import concurrent.futures
import hashlib
import json
import os
import sys
import threading
import time

from common import UsageError

RETRIED_STATUS = {408, 409, 429}  # and every 5xx: the request may succeed later; other 4xx never will
BACKOFF_CAP_S = 30.0


class InProcess:
    """model.generate on the loaded model: batches of --batch_size questions, left-padded."""

    def __init__(self, model):
        self.model = model

    def describe(self):
        return {"server": None, "served_model": None}

    def samples(self, prompter, questions, args, streamer=None):
        """Yield (position in questions, its samples), batch by batch, in order."""
        import torch

        tokenizer, k = prompter.tokenizer, args.num_return_sequences
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        for start in range(0, len(questions), args.batch_size):
            batch = questions[start:start + args.batch_size]
            inputs = prompter.batch([prompter.question_inputs(q) for q in batch], side="left",
                                    device=self.model.device)
            with torch.no_grad():  # generate() derives positions (a VLM's too) from the attention mask
                out = self.model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                          num_return_sequences=k, **sampling)
            new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i in range(len(batch)):
                yield start + i, [{"text": text, "tokens": generated_length(ids, tokenizer.eos_token_id),
                                   "finished": tokenizer.eos_token_id in ids}
                                  for text, ids in zip(texts[i * k:(i + 1) * k], new_tokens[i * k:(i + 1) * k])]


def generated_length(ids, eos):
    """Tokens a sample used, its eos included (what follows is padding)."""
    return ids.index(eos) + 1 if eos in ids else len(ids)


def sample_seed(base_seed, question_key, index):
    """The seed of one sample: the same question and sample index draw the same sample on a rerun."""
    digest = hashlib.sha256(f"{base_seed}/{question_key}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1  # a non-negative int32: every server takes it


class Server:
    """A running OpenAI-compatible server; built by connect(), which refuses what would fail before any request."""

    def __init__(self, client, url, served_model, prompt_kind, args):
        self.client, self.url, self.served_model, self.prompt_kind = client, url, served_model, prompt_kind
        self.concurrency, self.retries, self.timeout = args.concurrency, args.retries, args.request_timeout
        self.lock, self.failed = threading.Lock(), 0

    @classmethod
    def connect(cls, args, prompter):
        import openai

        if prompter.reads_images:
            raise UsageError("--server serves text models only here (images reach vLLM only through chat "
                             "completions, untested); evaluate a vision-language model in-process: drop --server")
        url = args.server.rstrip("/").removesuffix("/v1")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"),
                               max_retries=0, timeout=args.request_timeout)
        try:
            listed = list(client.with_options(timeout=10).models.list())
        except (openai.APIConnectionError, openai.APIStatusError) as err:
            raise UsageError(f"--server {args.server}: no model list at {url}/v1/models ({err}); start the server "
                             "first (QUICKSTART_GUIDE.md, 'Evaluation at scale') or fix the URL")
        names = [model.id for model in listed]
        served = args.served_model or (names[0] if len(names) == 1 else None)
        if served not in names:
            choice = f"--served_model {served} is not" if args.served_model else "pick one with --served_model; " \
                "these are"
            raise UsageError(f"{choice} among the models {url} serves: {', '.join(names) or 'none'}")
        owner = next(model.owned_by for model in listed if model.id == served)
        kind = args.server_prompt if args.server_prompt != "auto" else \
            "ids" if owner in ("vllm", "sglang") else "text"
        print(f"asking {served} at {url} (prompts as {kind}, {args.concurrency} requests at a time)")
        return cls(client, url, served, kind, args)

    def describe(self):
        return {"server": self.url, "served_model": self.served_model, "server_prompt": self.prompt_kind}

    def samples(self, prompter, questions, args, streamer=None):
        """Yield (position in questions, its samples, or None when a request kept failing) as they complete;
        --concurrency questions in flight, each asking for its samples one request after another."""
        pool = concurrent.futures.ThreadPoolExecutor(self.concurrency)
        try:
            futures = {pool.submit(self.ask, prompter, question, args): position
                       for position, question in enumerate(questions)}
            for future in concurrent.futures.as_completed(futures):
                samples = future.result()  # a fatal error is raised here, in the caller's thread
                if streamer is not None and samples:
                    streamer.on_finalized_text(samples[0]["text"], stream_end=True)
                yield futures[future], samples
        finally:  # a fatal error or an interrupted caller: nothing new is sent
            pool.shutdown(wait=True, cancel_futures=True)

    def prompt(self, prompter, question):
        """(what to send, the length of the kit's prompt ids)."""
        ids = prompter.prompt_ids(question)
        if self.prompt_kind == "ids":
            return ids, len(ids)
        text = prompter.render(prompter.format.user_turn(question["question"], question["options"]))
        tokenizer = prompter.tokenizer
        if tokenizer.bos_token and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = text.removeprefix(tokenizer.bos_token)  # the server tokenizes with special tokens: it adds it
        return text, len(ids)

    def ask(self, prompter, question, args):
        prompt, expected = self.prompt(prompter, question)
        key = question.get("id", question["question"])
        samples = []
        for index in range(args.num_return_sequences):
            body = {"model": self.served_model, "prompt": prompt, "max_tokens": args.max_new_tokens,
                    "temperature": args.temperature, "top_p": args.top_p if args.temperature else 1.0,
                    "seed": sample_seed(args.seed, key, index)}
            if self.prompt_kind == "text" and args.temperature:
                body["extra_body"] = {"generation_config": json.dumps({"do_sample": True})}
            response = self.request(body, key)
            if response is None:
                return None
            choice = response.choices[0]
            if response.usage.prompt_tokens != expected:
                raise UsageError(f"{self.url} read question {key}'s prompt as {response.usage.prompt_tokens} tokens, "
                                 f"the kit's prompt is {expected}: a second BOS, the server's chat template or "
                                 f"another tokenizer (--server_prompt {self.prompt_kind}); fix the server or "
                                 "--server_prompt before trusting any answer")
            samples.append({"text": choice.text, "tokens": response.usage.completion_tokens,
                            "finished": choice.finish_reason == "stop"})
        return samples

    def request(self, body, key):
        """The server's response, retried on what may pass (connection, timeout, 429, 5xx); None when the
        retries ran out; a UsageError at once on any other refusal."""
        import openai

        extra = body.pop("extra_body", None)
        for attempt in range(self.retries + 1):
            try:
                return self.client.completions.create(**body, extra_body=extra)
            except openai.APIStatusError as err:
                if err.status_code < 500 and err.status_code not in RETRIED_STATUS:
                    raise UsageError(f"{self.url} refused the request for question {key} "
                                     f"({err.status_code}: {err.message}); nothing retried")
                why = f"status {err.status_code}"
            except openai.APIConnectionError as err:  # timeouts included
                why = type(err).__name__
            if attempt < self.retries:
                time.sleep(min(2.0 ** attempt, BACKOFF_CAP_S))
        with self.lock:
            self.failed += 1
        print(f"question {key}: no answer after {self.retries + 1} tries ({why}); left unanswered",
              file=sys.stderr, flush=True)
        return None


def engine(model):
    """What answers: the server main() connected to, or the loaded model's generate()."""
    return model if isinstance(model, Server) else InProcess(model)
