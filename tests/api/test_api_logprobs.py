"""Log-probs through the API: the prompt scored and echoed, the reply's tokens with their alternatives,
token-id prompts, batches and n choices per prompt, in the shapes OpenAI's clients and
lm-evaluation-harness read. Numbers are checked against the engine's own scoring of the same tokens
(the perplexity path)."""
from __future__ import annotations

import json
import math
from operator import itemgetter

import httpx
import pytest

from apitools import MODEL_ID

CONTEXT = "The capital of France is"


def post(server, path, body):
    response = httpx.post(server.base_url + path, content=json.dumps(body).encode(), headers=server.headers(),
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def backend(server):
    return server.ctx.manager.get(MODEL_ID).backend


def lm_eval_parse_logprobs(outputs, ctxlens):
    """lm-evaluation-harness 0.4's LocalCompletionsAPI.parse_logprobs, as it reads our reply."""
    res = []
    for out in outputs:
        for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
            logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
            tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = True
            for tok, top in zip(tokens_logprobs, top_logprobs):
                if tok != max(top.values()):
                    is_greedy = False
                    break
            res.append((logprobs, is_greedy))
    return res


def test_lm_eval_loglikelihood_request_scores_the_continuation(api_server):
    """What `lm_eval --model local-completions` sends for a loglikelihood request: token-id prompts in a
    batch, echo, max_tokens 1, logprobs 1. The sum over the continuation is the engine's own score, and
    is-greedy is true for the model's greedy continuation and false for another one."""
    engine = backend(api_server)
    context = engine.tokenize(CONTEXT)
    greedy_reply = post(api_server, "/completions", {"model": MODEL_ID, "prompt": CONTEXT, "max_tokens": 2,
                                                     "temperature": 0})["choices"][0]["text"]
    greedy = engine.tokenize(CONTEXT + greedy_reply)[len(context):]
    assert engine.tokenize(CONTEXT + greedy_reply)[:len(context)] == context and greedy
    other = engine.tokenize(CONTEXT + " a banana")[len(context):]
    prompts = [context + greedy, context + other]
    body = {"model": MODEL_ID, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    out = post(api_server, "/completions", body)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice, ids in zip(out["choices"], prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1                       # the prompt, then the one new token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = engine.token_logprobs(ids)
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])    # one alternative + the chosen token
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts)) and out["usage"]["completion_tokens"] == 2
    (greedy_sum, greedy_flag), (other_sum, other_flag) = lm_eval_parse_logprobs([out], [len(context)] * 2)
    assert greedy_flag is True and other_flag is False
    assert greedy_sum == pytest.approx(sum(engine.token_logprobs(prompts[0])[len(context) - 1:]), abs=1e-3)
    assert greedy_sum > other_sum


def test_echo_with_max_tokens_zero_scores_the_prompt_without_generating(api_server):
    prompt = "Paris is the capital and largest city of France."
    out = post(api_server, "/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": 0, "echo": True,
                                            "logprobs": 0})
    choice = out["choices"][0]
    lp = choice["logprobs"]
    ids = backend(api_server).tokenize(prompt)
    assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(backend(api_server).token_logprobs(ids), abs=1e-4)
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top == {token: logprob}                                # logprobs 0: the chosen token only
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert choice["finish_reason"] == "length"


def test_sampled_reply_reports_its_own_tokens_with_alternatives(client):
    reply = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                      seed=7, logprobs=3)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == reply.usage.completion_tokens == 8
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top[token] == logprob
        assert 3 <= len(top) <= 4 and max(top.values()) >= logprob
    # the same request without logprobs samples the same text: scoring does not disturb sampling
    again = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                      seed=7)
    assert again.choices[0].text == choice.text


def test_chat_logprobs_in_the_openai_client_shape(client, api_server):
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content and len(content) == 6
    for item in content:
        assert len(item.top_logprobs) == 3 and item.bytes == list(item.token.encode())
        best = item.top_logprobs[0]
        assert best.logprob == item.logprob                          # greedy: the chosen token is the best
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
    plain = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=6, temperature=0)
    assert plain.choices[0].message.content == choice.message.content and plain.choices[0].logprobs is None
    probability = math.exp(sum(item.logprob for item in content))
    assert 0 < probability <= 1


def test_streamed_chat_logprobs_arrive_with_their_tokens(client, api_server):
    """`"stream": true` with log-probs: each chunk carries the log-probs of the tokens it adds, in the
    openai client's shape; together they are the unstreamed reply's, number for number (both come from
    the steps that drew the tokens), and the engine's scoring pass gives the same up to float rounding."""
    messages = [{"role": "user", "content": "Name three colours."}]
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    text, items, with_logprobs = "", [], 0
    for event in stream:
        choice = event.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs is not None:
            with_logprobs += 1
            assert "".join(t.token for t in choice.logprobs.content) == choice.delta.content
            items += choice.logprobs.content
    assert len(items) == 10 and with_logprobs == 10 and "".join(t.token for t in items) == text
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert whole.choices[0].message.content == text
    assert [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in items] == \
        [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in whole.choices[0].logprobs.content]
    engine = backend(api_server)
    prompt = engine.tokenize(engine.render_chat(messages))
    reply = engine.tokenize(text)
    assert [t.logprob for t in items] == pytest.approx(engine.token_logprobs(prompt + reply)[len(prompt) - 1:], abs=1e-4)
    for item in items:
        assert item.top_logprobs[0].logprob == item.logprob and len(item.top_logprobs) == 2


def test_streamed_completion_logprobs_run_on_over_the_reply(api_server):
    """Legacy completions streamed with `logprobs: n`: every event's text_offset continues where the last
    one ended, top_logprobs hold the alternatives and the chosen token, and the sampled text is the one
    the same seed gives without log-probs."""
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 3,
            "logprobs": 2, "stream": True}
    with httpx.stream("POST", api_server.base_url + "/completions", content=json.dumps(body).encode(),
                      headers=api_server.headers(), timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    text, tokens, offsets = "", [], []
    for event in events:
        choice = event["choices"][0]
        lp = choice["logprobs"]
        if lp is not None:
            assert "".join(lp["tokens"]) == choice["text"]
            tokens += lp["tokens"]
            offsets += lp["text_offset"]
            for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
                assert top[token] == logprob <= 0 and 2 <= len(top) <= 3
        text += choice["text"]
    assert len(tokens) == 8 and "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(8)]
    plain = post(api_server, "/completions", {**body, "stream": False, "logprobs": None})
    assert plain["choices"][0]["text"] == text


def sse_events(server, path, body):
    with httpx.stream("POST", server.base_url + path, content=json.dumps(body).encode(), headers=server.headers(),
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_everything_streams_choice_by_choice_as_the_unstreamed_reply(api_server):
    """Echo, several prompts, token-id prompts and n > 1 stream too (vLLM does): every event names its
    choice's index, a choice's pieces and log-probs join to what the same request answers unstreamed,
    each choice ends with its own finish reason, and usage comes last."""
    engine = backend(api_server)
    body = {"model": MODEL_ID, "prompt": [engine.tokenize("The capital of France is"), engine.tokenize("One, two, three,")], "max_tokens": 5, "temperature": 0.8,
            "seed": 11, "n": 2, "echo": True, "logprobs": 1}
    whole = post(api_server, "/completions", body)
    events = sse_events(api_server, "/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    streamed = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        got = streamed.setdefault(choice["index"], {"text": "", "tokens": [], "offsets": [], "logprobs": [],
                                                    "reasons": []})
        assert got["reasons"] == []                                         # nothing after a choice's end
        got["text"] += choice["text"]
        if choice["finish_reason"]:
            got["reasons"].append(choice["finish_reason"])
        if choice["logprobs"]:
            got["tokens"] += choice["logprobs"]["tokens"]
            got["offsets"] += choice["logprobs"]["text_offset"]
            got["logprobs"] += choice["logprobs"]["token_logprobs"]
    assert sorted(streamed) == [0, 1, 2, 3]
    order = [event["choices"][0]["index"] for event in events[:-1]]
    assert order == sorted(order)                                          # one choice after another
    for choice in whole["choices"]:
        got = streamed[choice["index"]]
        assert got["text"] == choice["text"] and got["reasons"] == [choice["finish_reason"]]
        assert got["tokens"] == choice["logprobs"]["tokens"] and got["offsets"] == choice["logprobs"]["text_offset"]
        assert got["logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
    assert streamed[2]["text"].startswith("One, two, three,") and streamed[0]["text"].startswith("The capital")


def test_streamed_chat_with_n_choices(client):
    messages = [{"role": "user", "content": "Name a fruit."}]
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0.9,
                                            seed=4, n=2, stream=True)
    texts, roles, reasons = {0: "", 1: ""}, set(), {}
    for event in stream:
        (choice,) = event.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.delta.role:
            roles.add(choice.index)
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0.9,
                                           seed=4, n=2)
    assert [texts[c.index] for c in whole.choices] == [c.message.content for c in whole.choices]
    assert roles == {0, 1} and reasons == {c.index: c.finish_reason for c in whole.choices}


def test_batch_of_prompts_answers_each_as_alone(client):
    prompts = ["The capital of France is", "One, two, three,"]
    batch = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=4, temperature=0)
    alone = [client.completions.create(model=MODEL_ID, prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == alone
    assert batch.usage.completion_tokens == 8


def test_token_id_prompt_generates_like_its_text(client, api_server):
    text = "One, two, three,"
    ids = backend(api_server).tokenize(text)
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_token_ids_outside_the_vocabulary_are_refused(api_server):
    vocab = backend(api_server).model.get_input_embeddings().num_embeddings
    for body in ({"prompt": [1, vocab], "max_tokens": 2}, {"prompt": [1, vocab], "max_tokens": 0, "echo": True},
                 {"prompt": [[1, 2], [1, vocab]], "max_tokens": 2}):
        response = httpx.post(api_server.base_url + "/completions", headers=api_server.headers(), timeout=60,
                              content=json.dumps({"model": MODEL_ID, **body}).encode())
        assert response.status_code == 400, response.text
        assert f"token id {vocab} is outside this model's vocabulary" in response.json()["error"]["message"]
    assert api_server.api.queue.finished[-1].generated_tokens == 0     # refused before the first prompt ran
    assert post(api_server, "/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1})["choices"]


@pytest.mark.parametrize("body, words", [
    ({"prompt": "Hi", "max_tokens": 0}, ("max_tokens must be >= 1",)),
    ({"prompt": "Hi", "logprobs": 21}, ("logprobs must be in [0, 20]",)),
    ({"prompt": "Hi", "logprobs": True}, ("logprobs must be an integer",)),
    ({"prompt": "Hi", "top_logprobs": 2}, ("top_logprobs is a chat field",)),
])
def test_bad_logprob_requests_are_400(api_server, body, words):
    response = httpx.post(api_server.base_url + "/completions", headers=api_server.headers(), timeout=60,
                          content=json.dumps({"model": MODEL_ID, **body}).encode())
    assert response.status_code == 400, response.text
    for word in words:
        assert word in response.json()["error"]["message"]


def test_n_choices_are_seeded_one_after_another(client, api_server):
    prompt = "Once upon a time"
    many = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=1.0, seed=5, n=3)
    one = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=1.0, seed=5)
    texts = [c.text for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert texts[0] == one.choices[0].text and len(set(texts)) > 1
    again = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=1.0, seed=6)
    assert texts[1] == again.choices[0].text                     # choice j is seed + j
    ids = backend(api_server).tokenize(prompt)
    assert many.usage.prompt_tokens == len(ids) and many.usage.completion_tokens == 24


def test_n_with_several_prompts_orders_choices_prompt_by_prompt(client):
    prompts = ["The capital of France is", "One, two, three,"]
    out = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=3, temperature=0, n=2)
    alone = [client.completions.create(model=MODEL_ID, prompt=p, max_tokens=3, temperature=0).choices[0].text
             for p in prompts]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
    chat = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0.8, seed=1, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.content for c in chat.choices)


def test_one_greedy_token_with_logprobs_is_the_generated_one(api_server, client, monkeypatch):
    """lm-eval's loglikelihood shape (echo, logprobs, max_tokens 1, temperature 0) is answered from the
    scoring pass alone (no generation: one pass over the prompt, not two): its token is the one a plain
    generation gives, and a reply that would end at once (the greedy token is end-of-turn) is empty with
    finish_reason stop, as generation says."""
    manager = api_server.ctx.manager
    generations = []
    generate_ids = manager.generate_ids

    def counted(*args, **kwargs):
        generations.append(args[1])
        return generate_ids(*args, **kwargs)
    monkeypatch.setattr(manager, "generate_ids", counted)
    for prompt in ("The capital of France is", "One, two, three,"):
        plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=1, temperature=0)
        scored = post(api_server, "/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": 1,
                                                   "temperature": 0, "logprobs": 2, "echo": True})
        choice = scored["choices"][0]
        assert choice["text"] == prompt + plain.choices[0].text and choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"][-1] == plain.choices[0].text
        assert scored["usage"]["completion_tokens"] == 1
    ended = "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\nOK."
    plain = client.completions.create(model=MODEL_ID, prompt=ended, max_tokens=1, temperature=0)
    assert plain.choices[0].text == "" and plain.choices[0].finish_reason == "stop"   # the premise
    scored = post(api_server, "/completions", {"model": MODEL_ID, "prompt": ended, "max_tokens": 1,
                                               "temperature": 0, "logprobs": 1})
    choice = scored["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "stop" and choice["logprobs"]["tokens"] == []
    assert scored["usage"]["completion_tokens"] == 0
    assert generations == []                        # every scored request above: the scoring pass alone
    post(api_server, "/completions", {"model": MODEL_ID, "prompt": ended, "max_tokens": 2, "temperature": 0,
                                      "logprobs": 1})
    assert len(generations) == 1                    # two tokens: generated, then scored


def test_max_tokens_wins_over_max_completion_tokens_with_echo(api_server):
    """The two budget fields are read once, in one order: `max_tokens: 2` beside `max_completion_tokens: 0`
    generates two tokens (the zero check used to look at either field on its own)."""
    out = post(api_server, "/completions", {"model": MODEL_ID, "prompt": "One, two, three,", "echo": True,
                                            "max_completion_tokens": 0, "max_tokens": 2, "temperature": 0})
    assert out["usage"]["completion_tokens"] == 2
    scored = post(api_server, "/completions", {"model": MODEL_ID, "prompt": "One, two, three,", "echo": True,
                                               "max_completion_tokens": 0, "temperature": 0})
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["text"] == "One, two, three,"


def test_logit_bias_and_penalties_through_the_openai_client(client, api_server):
    forced = backend(api_server).tokenize(" banana")[0]
    reply = client.completions.create(model=MODEL_ID, prompt="My favourite fruit is", max_tokens=3, temperature=0,
                                      logit_bias={str(forced): 100})
    assert reply.choices[0].text == " banana" * 3
    prompt = "Paris, Paris, Paris, Paris, Paris, Paris, Paris, Paris,"
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
    penalized = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0,
                                          presence_penalty=1.5, frequency_penalty=0.75).choices[0].text
    assert plain.count("Paris") > penalized.count("Paris") and penalized != plain
