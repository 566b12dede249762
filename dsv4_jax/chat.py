"""DeepSeek-V4 chat format: conversations -> prompt string, and model completions -> assistant messages.

The model was trained on one exact text layout (spec §13, the official ``encoding/encoding_dsv4.py``), so the
prompt must be reproduced byte for byte: a stray newline or a missing ``</think>`` changes the tokens the model
conditions on. This module is an independent re-implementation of that layout, checked against the official
test vectors (``tests/test_chat.py``). It is pure Python (no JAX) so it can run in any front end.

Layout summary (one conversation):

* ``<｜begin▁of▁sentence｜>`` then, in thinking mode with ``reasoning_effort="max"``, a fixed preamble.
* system: raw text (+ tools section, + response-format section); no role token.
* user / developer: ``<｜User｜>`` + text; OpenAI ``tool`` messages are folded into a user turn as
  ``<tool_result>…</tool_result>`` blocks. latest_reminder: ``<｜latest_reminder｜>`` + text.
* after a user/developer turn that is followed by an assistant, a latest_reminder or nothing:
  ``<｜Assistant｜>`` + ``<think>`` (model should think) or ``</think>`` (model answers directly).
* assistant: ``[reasoning</think>]content[DSML tool-call block]<｜end▁of▁sentence｜>``.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

#: Quick-instruction task name -> the special token that asks the model for that auxiliary output.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

#: Constant preamble of the format, placed right after BOS for ``reasoning_effort="max"`` in thinking mode.
#: ("high" is accepted but, as in the official encoder, adds nothing.)
REASONING_EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# The tools section of the system/developer prompt (a constant of the format; @ stands for the DSML marker).
_TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<@tool_calls>" block like the following:

<@tool_calls>
<@invoke name="$TOOL_NAME">
<@parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</@parameter>
...
</@invoke>
<@invoke name="$TOOL_NAME2">
...
</@invoke>
</@tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

%SCHEMAS%

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
""".replace("@", DSML)

_RESPONSE_FORMAT_SECTION = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

#: Where an assistant turn's tool-call block begins; content ends here (or at EOS).
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls>"
_TOOL_CALLS_END = f"</{DSML}tool_calls>"
_INVOKE_END = f"</{DSML}invoke>"
_INVOKE_RE = re.compile(f'<{DSML}invoke name="([^"\\n]*)">')
_PARAM_RE = re.compile(f'<{DSML}parameter name="([^"\\n]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL)


class ChatFormatError(ValueError):
    """Input the V4 chat format cannot express, or a completion that does not follow it (a ``ValueError``)."""


def _json(value: Any, what: str) -> str:
    """JSON as the format writes it: default separators, non-ASCII kept verbatim."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ChatFormatError(f"{what} is not JSON-serialisable: {err}") from err


def _text(content: Any, where: str, joiner: str = "") -> str:
    """Flatten a message's content (str, None, or a list of OpenAI ``{"type": "text"}`` blocks) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(block.get("text") or "")
            else:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise ChatFormatError(f"{where}: unsupported content block {kind!r} (only text is supported)")
        return joiner.join(parts)
    raise ChatFormatError(f"{where}: content must be a string, None or a list of text blocks, got {type(content).__name__}")


def render_tools(tools: list[dict], where: str = "tools") -> str:
    """The ``## Tools`` section for a list of OpenAI-style tools (``{"type": "function", "function": {...}}``)."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"{where}: expected a list of tools, got {type(tools).__name__}")
    schemas = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"{where}[{i}]: malformed tool, expected {{'type': 'function', 'function': {{'name': ...}}}}")
        schemas.append(_json(fn, f"{where}[{i}]"))
    return _TOOLS_SECTION.replace("%SCHEMAS%", "\n".join(schemas))


def _normalize_tool_calls(tool_calls: Any, where: str) -> list[tuple[str, dict, str]]:
    """Tool calls as ``(name, arguments_dict, call_id)``.

    Accepts OpenAI calls (``{"id", "function": {"name", "arguments": json_str}}``) and this module's own parsed
    form (``{"name", "arguments": dict}``). As in the official encoder, an arguments string that is not JSON is
    passed through as a single ``arguments`` string parameter; empty/missing arguments mean no parameters.
    """
    if not isinstance(tool_calls, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list, got {type(tool_calls).__name__}")
    out = []
    for i, tc in enumerate(tool_calls):
        fn = tc.get("function", tc) if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{where}.tool_calls[{i}]: malformed tool call (needs function.name): {tc!r}")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = {"arguments": args}
        if not isinstance(args, dict):
            raise ChatFormatError(f"{where}.tool_calls[{i}] ({fn['name']}): arguments must be a JSON object, got {args!r}")
        call_id = tc.get("id") or fn.get("id") or ""
        out.append((fn["name"], args, call_id))
    return out


def render_tool_calls(calls: list[tuple[str, dict, str]] | list[dict]) -> str:
    """The DSML block an assistant turn ends with (before EOS), starting with its two newlines."""
    if calls and isinstance(calls[0], dict):
        calls = _normalize_tool_calls(calls, "tool_calls")
    invokes = []
    for name, args, _ in calls:
        params = []
        for key, value in args.items():
            is_str = isinstance(value, str)
            shown = value if is_str else _json(value, f"tool call {name!r} parameter {key!r}")
            params.append(f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">{shown}</{DSML}parameter>')
        invokes.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n{_INVOKE_END}")
    return TOOL_CALLS_START + "\n" + "\n".join(invokes) + "\n" + _TOOL_CALLS_END


def _validate(messages: Any, label: str) -> None:
    """Reject what the format cannot express, naming the offending message."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"{label} must be a list of message dicts, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"{label}[{i}] must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{label}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ChatFormatError(f"{label}[{i}]: unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})")
        if role == "developer" and not msg.get("content"):
            raise ChatFormatError(f"{label}[{i}]: a developer message needs non-empty content")
        if msg.get("tool_calls") and role != "assistant":
            raise ChatFormatError(f"{label}[{i}]: only assistant messages may carry tool_calls (role is {role!r})")


def _merge_tool_messages(messages: list[dict], label: str) -> list[dict]:
    """Fold OpenAI ``tool`` messages into user turns (V4 has no tool role).

    Each user turn gets ``_blocks``: ``(kind, text, tool_call_id)`` with kind "text" or "tool". Tool results and
    user text that follow a user turn join it (rendered ``"\\n\\n"``-separated), like the official encoder.
    Deliberate difference: a user message with a ``task`` that joins the previous turn passes its task on
    (the official code silently drops it there).
    """
    merged: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        where = f"{label}[{i}] ({role})"
        joinable = bool(merged) and merged[-1]["role"] == "user"
        if role == "tool":
            block = ("tool", _text(msg.get("content"), where, "\n\n"), msg.get("tool_call_id") or "")
            if joinable:
                merged[-1]["_blocks"].append(block)
            else:
                merged.append({"role": "user", "_blocks": [block]})
        elif role == "user":
            block = ("text", _text(msg.get("content"), where), None)
            if joinable and merged[-1].get("task") is None:
                merged[-1]["_blocks"].append(block)
                if msg.get("task") is not None:
                    merged[-1]["task"] = msg["task"]
            else:
                new = {"role": "user", "_blocks": [block]}
                new.update({k: msg[k] for k in ("task", "wo_eos") if k in msg})
                merged.append(new)
        else:
            merged.append(copy.deepcopy(msg))
    return merged


def _sort_tool_results(messages: list[dict]) -> None:
    """Order each user turn's tool results like the preceding assistant's tool_calls (matched by call id)."""
    order: dict[str, int] = {}
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            calls = _normalize_tool_calls(msg["tool_calls"], f"messages[{i}]")
            order = {cid: k for k, (_, _, cid) in enumerate(calls) if cid}
        elif msg["role"] == "user":
            tools = [b for b in msg["_blocks"] if b[0] == "tool"]
            if len(tools) > 1 and order:
                ranked = iter(sorted(tools, key=lambda b: order.get(b[2], 0)))
                msg["_blocks"] = [next(ranked) if b[0] == "tool" else b for b in msg["_blocks"]]


def _last_user_index(messages: list[dict]) -> int:
    """Index of the last user/developer turn (-1 if none): it separates history from the turn being answered."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_history_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: strip assistants' reasoning and drop developer turns (official behaviour)."""
    last = _last_user_index(messages)
    out = []
    for i, msg in enumerate(messages):
        if i >= last or msg["role"] in ("user", "system", "latest_reminder"):
            out.append(msg)
        elif msg["role"] == "assistant":
            out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return out


def _render(index: int, messages: list[dict], thinking: bool, drop_thinking: bool, effort: str | None) -> str:
    """Render ``messages[index]`` plus the transition tokens that follow it."""
    msg = messages[index]
    role = msg["role"]
    where = f"message {index} ({role})"
    last_user = _last_user_index(messages)
    out = REASONING_EFFORT_MAX_PREFIX if index == 0 and thinking and effort == "max" else ""

    if role in ("system", "developer"):
        body = _text(msg.get("content"), where)
        if msg.get("tools"):
            body += "\n\n" + render_tools(msg["tools"], f"{where}.tools")
        if msg.get("response_format"):
            body += "\n\n" + _RESPONSE_FORMAT_SECTION + _json(msg["response_format"], f"{where}.response_format")
        out += (USER if role == "developer" else "") + body
    elif role == "user":
        parts = [text if kind == "text" else f"<tool_result>{text}</tool_result>" for kind, text, _ in msg["_blocks"]]
        out += USER + "\n\n".join(parts)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + _text(msg.get("content"), where)
    else:  # assistant
        calls = _normalize_tool_calls(msg["tool_calls"], where) if msg.get("tool_calls") else []
        follows_task = index > 0 and messages[index - 1].get("task") is not None
        reasoning = ""
        if thinking and not follows_task and (not drop_thinking or index > last_user):
            reasoning = _text(msg.get("reasoning_content"), f"{where}.reasoning_content") + THINK_END
        out += reasoning + _text(msg.get("content"), where) + (render_tool_calls(calls) if calls else "")
        if not msg.get("wo_eos", False):
            out += EOS

    # Transition: only when the next turn is the model's (an assistant or a latest_reminder) or this is the end.
    if index + 1 < len(messages) and messages[index + 1]["role"] not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None and task != "action":
        out += TASK_TOKENS[task]
    elif task == "action":
        out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS["action"]
    elif role in ("user", "developer"):
        think_now = thinking and (not drop_thinking or index >= last_user)
        out += ASSISTANT + (THINK_START if think_now else THINK_END)
    return out


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "chat",
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    context: list[dict] | None = None,
    add_bos: bool = True,
) -> str:
    """Render an OpenAI-style conversation into the DeepSeek-V4 prompt string (same output as the official
    ``encode_messages``).

    Args:
        messages: dicts with ``role`` in system/user/assistant/tool/developer/latest_reminder and ``content``;
            assistants may carry ``reasoning_content``, ``tool_calls`` and ``wo_eos`` (leave the turn open);
            system/developer may carry ``tools`` and ``response_format``; any message may carry a quick-instruction
            ``task`` (action/query/authority/domain/title/read_url).
        thinking_mode: "chat" (answer after ``</think>``) or "thinking" (model reasons after ``<think>``).
        drop_thinking: hide reasoning of turns before the last user turn. Forced off when any message has tools,
            because agentic tool loops must see their earlier reasoning.
        reasoning_effort: None, "high" (no change) or "max" (fixed preamble after BOS, thinking mode only).
        context: earlier messages whose encoding the caller already holds; they shape this rendering (history
            rules, tool-result order) but only ``messages`` are rendered, without BOS.
        add_bos: start with BOS when there is no context.
    Returns:
        The prompt text; tokenize it without adding a BOS token.
    Raises:
        ChatFormatError (a ValueError): unknown role/task/mode/effort, malformed tool call or tool schema, unsupported content.
    """
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    context = context or []
    _validate(context, "context")
    _validate(messages, "messages")

    ctx = _merge_tool_messages(context, "context")
    full = ctx + _merge_tool_messages(messages, "messages")
    _sort_tool_results(full)
    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        context_len = len(_drop_history_thinking(ctx))
        full = _drop_history_thinking(full)
    else:
        context_len = len(ctx)

    prompt = BOS if add_bos and not context else ""
    for index in range(context_len, len(full)):
        prompt += _render(index, full, thinking, drop, reasoning_effort)
    return prompt


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """Parse the DSML block whose opening tag ends at ``pos``; return the calls and the offset after the block.

    Whitespace between tags is tolerated; parameter values are taken verbatim.
    """
    def fail(why: str, at: int) -> ChatFormatError:
        return ChatFormatError(f"malformed DSML tool-call block at offset {at}: {why}; text there: {text[at:at + 80]!r}")

    calls = []
    while True:
        pos = _skip_ws(text, pos)
        if text.startswith(_TOOL_CALLS_END, pos):
            return calls, pos + len(_TOOL_CALLS_END)
        m = _INVOKE_RE.match(text, pos)
        if not m:
            raise fail("expected '<｜DSML｜invoke name=\"...\">' or '</｜DSML｜tool_calls>'", pos)
        name, pos, args = m.group(1), m.end(), {}
        while True:
            pos = _skip_ws(text, pos)
            if text.startswith(_INVOKE_END, pos):
                pos += len(_INVOKE_END)
                break
            p = _PARAM_RE.match(text, pos)
            if not p:
                raise fail(f"tool call {name!r}: expected a parameter or '</｜DSML｜invoke>'", pos)
            key, is_str, raw = p.groups()
            if key in args:
                raise fail(f"tool call {name!r}: duplicate parameter {key!r}", pos)
            if is_str == "true":
                args[key] = raw
            else:
                try:
                    args[key] = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise fail(f"tool call {name!r}: parameter {key!r} is string=\"false\" but not JSON ({err})", pos) from None
            pos = p.end()
        calls.append({"name": name, "arguments": args})


def parse_completion(text: str, thinking_mode: str = "chat", strict: bool = True) -> dict:
    """Parse generated text (everything after the prompt) back into an assistant message.

    The inverse of how an assistant turn renders: reasoning ends at ``</think>`` (thinking mode), content ends at
    EOS or at the DSML tool-call block, which must be followed by EOS.

    Args:
        text: the decoded completion, special tokens kept (``skip_special_tokens=False``).
        thinking_mode: the mode the prompt was encoded with.
        strict: like the official parser, require ``</think>`` (thinking mode) and EOS, and reject special tokens
            inside reasoning/content. With ``strict=False`` a completion cut off by a length limit is accepted:
            no ``</think>`` means it is all reasoning, no EOS means content runs to the end.
    Returns:
        ``{"role": "assistant", "reasoning_content": str, "content": str, "tool_calls": [{"name", "arguments"}]}``
        where ``arguments`` is a dict (``string="true"`` values raw, others JSON-decoded).
    Raises:
        ChatFormatError (a ValueError): malformed completion (the message says where).
    """
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if not isinstance(text, str):
        raise ChatFormatError(f"completion must be a str, got {type(text).__name__}")
    reasoning, pos = "", 0
    if thinking_mode == "thinking":
        if text.startswith(THINK_START):  # tolerate a completion that repeats the prompt's trailing <think>
            pos = len(THINK_START)
        end, tc = text.find(THINK_END, pos), text.find(TOOL_CALLS_START, pos)
        if end == -1 and tc == -1 and not strict:  # cut off while still thinking
            stop = text.find(EOS, pos)
            return _message(text[pos:] if stop == -1 else text[pos:stop], "", [])
        if end == -1 or (tc != -1 and tc < end):
            raise ChatFormatError("thinking-mode completion has no '</think>' before its content/tool calls")
        reasoning, pos = text[pos:end], end + len(THINK_END)

    eos, tc = text.find(EOS, pos), text.find(TOOL_CALLS_START, pos)
    calls: list[dict] = []
    if tc != -1 and (eos == -1 or tc < eos):
        content = text[pos:tc]
        calls, pos = _parse_tool_calls(text, tc + len(TOOL_CALLS_START))
        rest = text[pos:]
        if rest not in (EOS, "") or (strict and rest != EOS):
            raise ChatFormatError(f"expected EOS right after the tool-call block, got {rest[:80]!r}")
    elif eos != -1:
        content, rest = text[pos:eos], text[eos + len(EOS):]
        if rest:
            raise ChatFormatError(f"unexpected text after EOS: {rest[:80]!r}")
    elif strict:
        raise ChatFormatError("completion does not end with EOS '<｜end▁of▁sentence｜>' (pass strict=False if truncated)")
    else:
        content = text[pos:]

    if strict:
        for token in (BOS, EOS, THINK_START, THINK_END, DSML):
            for field, value in (("reasoning_content", reasoning), ("content", content)):
                if token in value:
                    raise ChatFormatError(f"unexpected special token {token!r} in parsed {field}")
    return _message(reasoning, content, calls)


def _message(reasoning: str, content: str, calls: list[dict]) -> dict:
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": calls}
