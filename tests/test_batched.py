"""One llama.cpp context for all of a model's sequences (backends/llama_cpp/batched.py),
on real llama.cpp and the tiny generated model: batching changes nothing but speed,
a conversation is not read twice, and each sequence keeps its own sampling and limits.

Most tests drive ``step()`` themselves, so that "at the next step" and "the others go
on" are facts to count, not times to wait for.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest

from anyad.backends.llama_cpp.batched import (
    BatchedContext,
    ContextSettings,
    Delta,
    Done,
    GenerationParams,
    Handle,
    RequestRejected,
)

GREEDY = GenerationParams(temperature=0, max_tokens=48)
QUESTIONS = ["Hello there", "What is the weather in Oslo today?", "Tell me a long story about a dragon. " * 3, "x"]


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def make(tiny_model: Path):
    """``make(parallel, **settings)``: a context on the tiny model, closed at the end.
    One thread: the machine is shared, and batching does not depend on it."""
    opened: list[BatchedContext] = []

    def open_(parallel: int = 1, **kw) -> BatchedContext:
        ctx = BatchedContext(ContextSettings(path=str(kw.pop("path", tiny_model)), n_ctx=kw.pop("n_ctx", 512),
                                             parallel=parallel, n_threads=1, **kw))
        opened.append(ctx)
        return ctx

    yield open_
    for ctx in opened:
        ctx.close()


def drain(ctx: BatchedContext) -> None:
    while ctx.step():
        pass


def taken(h: Handle) -> list:
    """The events a handle has now (without waiting)."""
    out = []
    while True:
        try:
            out.append(h.events.get_nowait())
        except queue.Empty:
            return out


def text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def done(events: list) -> Done:
    assert isinstance(events[-1], Done) and sum(isinstance(e, Done) for e in events) == 1
    return events[-1]


def alone(make, prompt: list[int], params: GenerationParams = GREEDY) -> list:
    ctx = make(1)
    h = ctx.submit(prompt, params)
    drain(ctx)
    return taken(h)


@pytest.mark.parametrize("parallel", [2, 4])
def test_sequences_decoded_together_produce_what_each_produces_alone(make, tiny_model, parallel):
    import llama_cpp

    ctx = make(parallel)
    prompts = [ctx.tokenize(chat(q)) for q in QUESTIONS[:parallel]]
    handles = [ctx.submit(p, GREEDY) for p in prompts]
    assert ctx.step() and ctx.stats().active == parallel  # all of them in the first step
    drain(ctx)
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=512, n_threads=1, verbose=False)
    for p, h in zip(prompts, handles):
        together, by_itself = taken(h), alone(make, p)
        assert done(together).tokens == done(by_itself).tokens
        assert text(together) == text(by_itself)
        assert done(together).usage.completion_tokens == 48 and done(together).reason == "length"
        # ...and what llama-cpp-python's own generation gives, with the same greedy settings.
        assert text(together) == llm.create_completion(p, max_tokens=48, temperature=0)["choices"][0]["text"]


def test_sampling_chains_sample_as_create_completion_does(make, tiny_model):
    """Seeded draws, top-k/p, min-p, penalties and logit bias, several sequences at once,
    each as llama-cpp-python samples it alone: the chain is built in its order."""
    import llama_cpp

    # Flash attention on both sides: its kernel gives a sequence the same logits whatever
    # else is in the batch, so seeded draws compare exactly (llama.cpp's other attention path
    # sums in an order that depends on the batch, enough to move a draw at temperature 0.9).
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=512, n_threads=1, verbose=False, flash_attn=True)
    cases = [{"temperature": 0.9, "seed": 7}, {"temperature": 1.2, "top_k": 10, "top_p": 0.8, "min_p": 0.1, "seed": 3},
             {"temperature": 0, "repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4}]
    ctx = make(len(cases), flash_attention="on")
    prompt = ctx.tokenize(chat("Hello there"))
    handles = [ctx.submit(prompt, GenerationParams(max_tokens=32, **c)) for c in cases]
    drain(ctx)
    for c, h in zip(cases, handles):
        assert text(taken(h)) == llm.create_completion(prompt, max_tokens=32, **c)["choices"][0]["text"], c
    biased = ctx.submit(prompt, GenerationParams(temperature=0, max_tokens=8, logit_bias={ord("A"): 100.0}))
    plain = ctx.submit(prompt, GREEDY)
    drain(ctx)
    assert text(taken(biased)) == "A" * 8
    assert done(taken(plain)).tokens == done(alone(make, prompt)).tokens


def test_a_long_prompt_is_read_in_chunks_while_a_stream_keeps_flowing(make):
    ctx = make(2, n_batch=8)
    short = ctx.tokenize(chat("Hi"))
    a = ctx.submit(short, GenerationParams(temperature=0, max_tokens=60))
    a_events: list = []
    while not a_events:  # its prompt read (in chunks of 8), its first token out
        ctx.step()
        a_events += taken(a)
    long_prompt = ctx.tokenize(chat(QUESTIONS[2]))
    assert len(long_prompt) > 40
    b = ctx.submit(long_prompt, GenerationParams(temperature=0, max_tokens=8))
    read_before = ctx.stats().prompt_tokens_read
    steps = 0
    while ctx.stats().prompt_tokens_read - read_before < len(long_prompt):
        read = ctx.stats().prompt_tokens_read
        ctx.step()
        steps += 1
        got = taken(a)
        # Every step: one more token for the running stream, and at most the rest of
        # n_batch (8, less its one token) of the prompt.
        assert len(got) == 1 and isinstance(got[0], Delta), got
        a_events += got
        assert ctx.stats().prompt_tokens_read - read <= 7
        assert ctx.stats().active == 2  # the new request joined at the first step
    assert steps >= len(long_prompt) // 7
    drain(ctx)
    a_events += taken(a)
    assert done(a_events).tokens == done(alone(make, short, GenerationParams(temperature=0, max_tokens=60))).tokens
    assert done(taken(b)).tokens == done(alone(make, long_prompt, GenerationParams(temperature=0, max_tokens=8))).tokens


def test_a_cancelled_sequence_leaves_at_once_and_the_others_go_on(make):
    ctx = make(3)
    prompts = [ctx.tokenize(chat(q)) for q in QUESTIONS[:3]]
    params = GenerationParams(temperature=0, max_tokens=40)
    handles = [ctx.submit(p, params) for p in prompts]
    for _ in range(5):
        ctx.step()
    ctx.cancel(handles[1])
    ctx.step()
    cancelled = taken(handles[1])
    end = done(cancelled)
    assert end.reason == "cancelled" and end.usage.completion_tokens == 5
    slot = next(s for s in ctx.stats().slots if s.handle is None)
    assert ctx.stats().active == 2 and not slot.busy
    ctx.cancel(handles[1])  # again, after its end: nothing happens
    drain(ctx)
    for i in (0, 2):
        assert done(taken(handles[i])).tokens == done(alone(make, prompts[i], params)).tokens


def test_a_waiting_request_joins_when_a_slot_frees_or_leaves_when_cancelled(make):
    ctx = make(2)
    p = [ctx.tokenize(chat(q)) for q in QUESTIONS]
    first = ctx.submit(p[0], GenerationParams(temperature=0, max_tokens=3))
    second = ctx.submit(p[1], GenerationParams(temperature=0, max_tokens=30))
    third = ctx.submit(p[2], GenerationParams(temperature=0, max_tokens=4))
    fourth = ctx.submit(p[3], GenerationParams(temperature=0, max_tokens=4))
    ctx.step()
    assert ctx.stats().active == 2 and ctx.stats().waiting == 2
    ctx.cancel(fourth)
    ctx.step()
    assert done(taken(fourth)).reason == "cancelled" and ctx.stats().waiting == 1
    ctx.step()  # the first request's third token: it ends, and its slot is free
    assert done(taken(first)).reason == "length"
    ctx.step()  # the third request takes it
    assert ctx.stats().active == 2 and ctx.stats().waiting == 0
    drain(ctx)
    assert done(taken(third)).tokens == done(alone(make, p[2], GenerationParams(temperature=0, max_tokens=4))).tokens
    assert done(taken(second)).usage.completion_tokens == 30


def test_a_second_turn_reads_only_its_new_tokens(make):
    ctx = make(2)
    turn1 = ctx.tokenize(chat("What is the weather in Oslo today?"))
    h1 = ctx.submit(turn1, GREEDY)
    drain(ctx)
    reply = done(taken(h1))
    assert reply.usage.cached_tokens == 0
    # What a chat client sends next: the whole conversation, then a new question.
    turn2 = turn1 + list(reply.tokens) + ctx.tokenize("<|im_end|>\n" + chat("And tomorrow?"))
    read = ctx.stats().prompt_tokens_read
    h2 = ctx.submit(turn2, GREEDY)
    drain(ctx)
    second = done(taken(h2))
    # Every token the first turn decoded (its prompt, and its reply but the last token
    # sampled) is reused; only the rest is read.
    assert second.usage.cached_tokens == len(turn1) + len(reply.tokens) - 1
    assert ctx.stats().prompt_tokens_read - read == len(turn2) - second.usage.cached_tokens == second.usage.prompt_read
    # Reuse changes nothing but speed.
    assert second.tokens == done(alone(make, turn2)).tokens
    # The same prompt again (a regenerated answer): all of it but its last token, whose
    # logits the first draw needs.
    h3 = ctx.submit(turn2, GREEDY)
    drain(ctx)
    again = done(taken(h3))
    assert again.usage.cached_tokens == len(turn2) - 1 and again.tokens == second.tokens


def test_each_conversation_goes_back_to_the_slot_that_holds_it(make):
    ctx = make(2)
    convs = [ctx.tokenize(chat("What is the weather in Oslo today?")), ctx.tokenize(chat("Name a colour, please."))]
    held = [0, 0]
    for turn in range(3):
        # Turns in rotation, each resending its whole conversation: none is read twice.
        handles = [ctx.submit(c, GenerationParams(temperature=0, max_tokens=6)) for c in convs]
        drain(ctx)
        for i, h in enumerate(handles):
            end = done(taken(h))
            assert end.usage.cached_tokens == held[i], (turn, i, end.usage)
            # What its slot holds now: the prompt, and the reply but its last token.
            held[i] = len(convs[i]) + len(end.tokens) - 1
            convs[i] = convs[i] + list(end.tokens) + ctx.tokenize("<|im_end|>\n" + chat(f"More, turn {turn}?"))
    assert sorted(s.cached_tokens for s in ctx.stats().slots) == sorted(held)


def test_a_new_conversation_takes_an_empty_slot_before_one_holding_another(make):
    ctx = make(2)
    system = "<|im_start|>system\nYou are a helpful assistant, brief and exact.<|im_end|>\n"
    a = ctx.tokenize(system + chat("What is the weather in Oslo today? Tell me of the rain and the wind."))
    h = ctx.submit(a, GenerationParams(temperature=0, max_tokens=20))
    drain(ctx)
    done(taken(h))
    held = ctx.stats().slots[0].cached_tokens
    b = ctx.tokenize(system + chat("Name a colour."))
    h = ctx.submit(b, GenerationParams(temperature=0, max_tokens=4))
    drain(ctx)
    assert done(taken(h)).usage.cached_tokens == 0  # the system prompt alone: not worth a conversation
    assert ctx.stats().slots[0].cached_tokens == held  # the first conversation is still there


def test_grammar_and_stop_strings_hold_per_sequence(make):
    from llama_cpp.llama_grammar import LlamaGrammar

    ctx = make(3)
    prompt = ctx.tokenize(chat("Answer in JSON."))
    free_text = text(alone(make, prompt))
    stop = free_text[10:13]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    # The same GBNF text the worker builds for response_format (LlamaGrammar.from_json_schema).
    gbnf = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)._grammar
    shaped = ctx.submit(prompt, GenerationParams(temperature=0, max_tokens=200, grammar=gbnf))
    stopped = ctx.submit(prompt, GenerationParams(temperature=0, max_tokens=48, stop=[stop, "never-seen"]))
    plain = ctx.submit(prompt, GREEDY)
    drain(ctx)
    ev = taken(shaped)
    assert done(ev).reason == "stop"  # the grammar complete, only the end token was left
    assert set(json.loads(text(ev))) == {"n"}
    ev = taken(stopped)
    assert done(ev).reason == "stop"
    assert text(ev) == free_text[:free_text.index(stop)]  # nothing of the stop string reaches the client
    assert text(taken(plain)) == free_text


def test_a_character_split_over_tokens_reaches_the_client_whole(make):
    ctx = make(1)
    # The tiny vocabulary spells "é" with two byte tokens; the grammar makes it write them.
    h = ctx.submit(ctx.tokenize(chat("Hi")), GenerationParams(temperature=0, max_tokens=10, grammar='root ::= "é!"'))
    drain(ctx)
    ev = taken(h)
    assert [e.text for e in ev if isinstance(e, Delta)] == ["é", "!"]
    assert len(ev[0].tokens) == 2 and done(ev).usage.completion_tokens == 3


def test_max_tokens_bounds_every_sequence(make):
    ctx = make(4, n_ctx=64)
    prompts = [ctx.tokenize(chat(q)) for q in QUESTIONS[:2]]
    handles = [ctx.submit(prompts[i % 2], GenerationParams(temperature=0, max_tokens=n)) for i, n in
               enumerate([1, 3, 7])]
    to_the_end = ctx.submit(prompts[0], GenerationParams(temperature=0))  # no limit: the sequence's context
    drain(ctx)
    for h, n in zip(handles, [1, 3, 7]):
        end = done(taken(h))
        assert end.reason == "length" and end.usage.completion_tokens == n == len(end.tokens)
    end = done(taken(to_the_end))
    assert end.reason == "length" and end.usage.completion_tokens == 64 - len(prompts[0])


def test_it_reads_the_model_as_llama_does(make, tiny_model):
    import llama_cpp

    ctx = make(1)
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=64, n_threads=1, verbose=False)
    assert ctx.metadata() == llm.metadata and "tokenizer.chat_template" in ctx.metadata()
    prompt = chat("Hello <|im_end|> there")
    assert ctx.tokenize(prompt) == llm.tokenize(prompt.encode(), add_bos=True, special=True)
    assert ctx.n_vocab == llm.n_vocab() and ctx.is_eog(llm.token_eos())


def test_requests_it_cannot_take_are_refused_up_front(make):
    ctx = make(1, n_ctx=64)
    with pytest.raises(RequestRejected) as e:
        ctx.submit([], GREEDY)
    assert e.value.code == "invalid_request"
    with pytest.raises(RequestRejected) as e:
        ctx.submit([65] * 64, GREEDY)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected):
        ctx.submit([ctx.n_vocab], GREEDY)
    with pytest.raises(RequestRejected) as e:
        ctx.submit([65], GenerationParams(grammar="root ::= ("))
    assert e.value.param == "grammar"
    with pytest.raises(RequestRejected) as e:
        ctx.submit([65], GenerationParams(logit_bias={ctx.n_vocab + 5: 1.0}))
    assert e.value.param == "logit_bias"
    assert ctx.stats().active == ctx.stats().waiting == 0


def test_the_run_loop_serves_threads_and_cancels_within_a_token(make):
    ctx = make(3)
    ctx.start()
    prompts = [ctx.tokenize(chat(q)) for q in QUESTIONS[:3]]
    seen: "queue.SimpleQueue[tuple[int, object]]" = queue.SimpleQueue()
    mid_stats = []
    victim: list[Handle] = []
    count = [0]

    def sink(ev) -> None:  # on the context's thread
        seen.put((ev.handle, ev))
        if isinstance(ev, Delta) and victim and ev.handle == victim[0].id:
            count[0] += 1
            if count[0] == 5:
                mid_stats.append(ctx.stats())  # answered mid-generation, from anywhere
                ctx.cancel(victim[0])

    results: dict[int, list] = {}

    def client(i: int) -> None:
        h = ctx.submit(prompts[i], GenerationParams(temperature=0, max_tokens=30))
        results[i] = list(h)

    victim.append(ctx.submit(prompts[0], GenerationParams(temperature=0, max_tokens=300), on_event=sink))
    threads = [threading.Thread(target=client, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    victim_events = []
    while not victim_events or not isinstance(victim_events[-1], Done):
        victim_events.append(seen.get(timeout=60)[1])
    end = done(victim_events)
    assert end.reason == "cancelled" and end.usage.completion_tokens == 5  # not one token more
    # As of the step before (the one running is not waited for).
    assert mid_stats[0].active >= 1 and mid_stats[0].tokens_generated >= 4
    for i in (1, 2):
        assert done(results[i]).tokens == done(alone(make, prompts[i], GenerationParams(temperature=0,
                                                                                          max_tokens=30))).tokens
    ctx.close()
    with pytest.raises(RuntimeError):
        ctx.submit(prompts[0], GREEDY)


def test_close_ends_what_is_running(make):
    ctx = make(1)
    prompt = ctx.tokenize(chat("Hi"))
    running = ctx.submit(prompt, GREEDY)
    queued = ctx.submit(prompt, GREEDY)
    ctx.step()
    ctx.close()
    assert done(taken(running)).reason == "cancelled"
    assert done(taken(queued)).reason == "cancelled"


def test_logits_observer_sees_the_row_each_token_came_from(make):
    ctx = make(2)
    prompt = ctx.tokenize(chat("Hi"))
    rows: list[tuple[int, int]] = []
    h = ctx.submit(prompt, GenerationParams(temperature=0, max_tokens=6),
                   on_logits=lambda row, token: rows.append((int(row.argmax()), token)))
    other = ctx.submit(ctx.tokenize(chat("Other")), GenerationParams(temperature=0, max_tokens=6))
    drain(ctx)
    assert len(rows) == 6 and all(best == token for best, token in rows)
    assert [t for _, t in rows] == list(done(taken(h)).tokens)
    done(taken(other))


def test_a_quantized_kv_cache_and_separate_streams_load_and_generate(make, tmp_path):
    import ggufmaker

    # Blocks of 32 values: a q8_0 cache needs heads of a multiple of that (the tiny model's are 16).
    wide_heads = ggufmaker.write_model(tmp_path / "heads32.gguf", ggufmaker.Shape(n_head=2, n_head_kv=1))
    for kw in ({"kv_type": "q8_0", "flash_attention": "on", "path": wide_heads}, {"kv_unified": False}):
        ctx = make(2, **kw)
        prompt = ctx.tokenize(chat("Hi"))
        hs = [ctx.submit(prompt, GenerationParams(temperature=0, max_tokens=5)) for _ in range(2)]
        drain(ctx)
        assert [done(taken(h)).usage.completion_tokens for h in hs] == [5, 5]
    with pytest.raises(RuntimeError):  # refused by llama.cpp, not a crash
        make(1, kv_type="q8_0")
    with pytest.raises(ValueError):
        make(1, kv_type="q4_0", flash_attention="off")


# ---- the prompt cache: RAM and disk tiers ----

def turn(ctx: BatchedContext, prompt: list[int], max_tokens: int = 8) -> Done:
    h = ctx.submit(prompt, GenerationParams(temperature=0, max_tokens=max_tokens))
    drain(ctx)
    return done(taken(h))


def conversation(ctx: BatchedContext, text: str) -> tuple[list[int], list[int]]:
    """A first turn and the prompt of its second (first prompt + reply + a new question)."""
    first = ctx.tokenize(chat(text))
    reply = turn(ctx, first)
    return first, [*first, *reply.tokens, *ctx.tokenize("<|im_end|>\n" + chat("And then?"), add_special=False)]


def test_a_conversation_pushed_out_of_its_slot_comes_back_from_ram(make):
    ctx = make(1, prompt_cache_bytes=64 << 20)
    first, second = conversation(ctx, QUESTIONS[2])
    turn(ctx, ctx.tokenize(chat(QUESTIONS[1] * 4)))  # another conversation takes the only slot
    back = turn(ctx, second)
    # Its state came back from the cache: only the new question was read.
    assert back.usage.cached_tokens >= len(first) and ctx.stats().prompt_cache["hits"] == 1
    # ... and it answers exactly as reading the whole prompt afresh does.
    fresh = make(1)
    assert turn(fresh, second).tokens == back.tokens
    assert turn(fresh, second).usage.cached_tokens == len(second) - 1  # (its own slot still held it)


def test_without_a_cache_the_pushed_out_conversation_is_read_again(make):
    ctx = make(1)
    _, second = conversation(ctx, QUESTIONS[2])
    turn(ctx, ctx.tokenize(chat(QUESTIONS[1] * 4)))
    assert turn(ctx, second).usage.cached_tokens < 16  # the template's opening at most


def test_the_cache_survives_a_reload_from_disk_and_is_refused_for_a_changed_file(make, tmp_path, tiny_model):
    import shutil

    import ggufmaker

    model = tmp_path / "m.gguf"
    shutil.copy(tiny_model, model)
    disk = tmp_path / "kv"
    ctx = make(1, path=model, prompt_cache_bytes=64 << 20, prompt_cache_dir=str(disk),
               prompt_cache_disk_bytes=256 << 20)
    first, second = conversation(ctx, QUESTIONS[2])
    ctx.close()  # an unload: the slots' conversations go to disk
    assert list(disk.rglob("*.kv"))

    again = make(1, path=model, prompt_cache_bytes=64 << 20, prompt_cache_dir=str(disk),
                 prompt_cache_disk_bytes=256 << 20)
    back = turn(again, second)
    assert back.usage.cached_tokens >= len(first)
    assert back.tokens == turn(make(1, path=model), second).tokens
    again.close()

    # Another model in the same file: nothing saved for the old one is served, and it is removed.
    ggufmaker.write_model(model, seed=1)
    other = make(1, path=model, prompt_cache_bytes=64 << 20, prompt_cache_dir=str(disk),
                 prompt_cache_disk_bytes=256 << 20)
    assert turn(other, second).usage.cached_tokens == 0
    assert other.stats().prompt_cache["hits"] == 0


def test_the_disk_tier_keeps_to_its_size_least_recently_used_out(make, tmp_path):
    disk = tmp_path / "kv"
    probe = make(1)
    first, _ = conversation(probe, QUESTIONS[2])
    # Room on disk for about two of these conversations' states (the tiny model's KV is
    # 256 bytes a token); none in RAM, so each goes to disk when its slot is taken.
    cap = int(2.5 * 256 * (len(first) + 8))
    ctx = make(1, prompt_cache_bytes=1, prompt_cache_dir=str(disk), prompt_cache_disk_bytes=cap)
    seconds = [conversation(ctx, f"{i} {QUESTIONS[2]}")[1] for i in range(4)]
    turn(ctx, ctx.tokenize(chat("x")))  # the last one out of the slot too
    assert ctx.prompt_cache is not None and ctx.prompt_cache.written(60)  # (files are written on a thread)
    files = list(disk.rglob("*.kv"))
    assert 1 <= len(files) <= 2 and sum(f.stat().st_size for f in files) <= cap + 2 * 4096
    # The oldest went first: the last conversation is still there, the first is not.
    assert turn(ctx, seconds[3]).usage.cached_tokens > 16
    assert turn(ctx, seconds[0]).usage.cached_tokens < 16


def test_a_conversation_id_keeps_an_edited_conversation_in_its_slot(make):
    def second_turn(conversation: str | None) -> int:
        ctx = make(2)
        first = ctx.tokenize(chat(QUESTIONS[2] * 2))
        h = ctx.submit(first, GREEDY, conversation="c1")
        drain(ctx)
        done(taken(h))
        # The client rewrote the end of its history: the prompt shares less than half of what
        # the slot holds, so without the id an empty slot is taken and the shared part read again.
        edited = first[:len(first) // 3] + ctx.tokenize("Something else entirely", add_special=False)
        again = ctx.submit(edited, GREEDY, conversation=conversation)
        drain(ctx)
        return done(taken(again)).usage.cached_tokens - len(first) // 3

    assert second_turn(None) < -16
    assert second_turn("c1") >= -1


def test_a_hostile_or_broken_cache_folder_never_stops_the_model_nor_lies_about_reuse(make, tmp_path):
    import json as _json
    import struct

    disk = tmp_path / "kv"
    settings = {"prompt_cache_bytes": 1, "prompt_cache_dir": str(disk), "prompt_cache_disk_bytes": 64 << 20}
    ctx = make(1, **settings)
    first, second = conversation(ctx, QUESTIONS[2])
    ctx.close()
    (saved,) = disk.rglob("*.kv")
    folder = saved.parent
    # A state whose payload was cut short (its header intact), beside junk of every kind.
    saved.write_bytes(saved.read_bytes()[:-200])
    (folder / "dir.kv").mkdir()
    (folder / "dir.tmp").mkdir()
    header = _json.dumps([1, 2]).encode()
    (folder / "list.kv").write_bytes(b"ANYADKV1" + struct.pack("<I", len(header)) + header)
    header = _json.dumps({"identity": "x", "n_tokens": 10 ** 12}).encode()
    (folder / "huge.kv").write_bytes(b"ANYADKV1" + struct.pack("<I", len(header)) + header)

    again = make(1, **settings)
    before = again.stats().prompt_tokens_read
    h = again.submit(second, GenerationParams(temperature=0, max_tokens=4))
    drain(again)
    usage = done(taken(h)).usage
    # llama.cpp refused the cut state: the prompt was read, and the usage says so.
    assert again.stats().prompt_tokens_read - before == usage.prompt_tokens - usage.cached_tokens
    assert usage.cached_tokens == 0 and again.stats().prompt_cache["misses"] == 1
    assert not saved.exists()  # never offered again
