"""Fine-tuning data: the JSONL records accepted, and the files `--dataset-type sft` writes.

Input records (one JSON value per line; an optional ``task`` or ``data_name`` string names the
task, default ``"default"``):

- conversations: ``{"messages": [{"role": ..., "content": ...}, ...]}`` or the same list under
  ``chat_rounds`` (MFTCoder) or ``conversations``; each round may also be a single-key dict
  ``{"user": "..."}``; a line that is itself such a list is a conversation too. Roles: ``system``,
  ``user`` (or ``human``), ``assistant`` (or ``bot``), any case.
- instructions: ``{"instruction": ..., "input": ... (optional), "output": ..., "system": ...
  (optional)}``: a user turn ``instruction`` (+ ``"\\n\\n" + input`` when non-empty), then the
  answer ``output``.
- plain text: ``{"text": ...}`` for continued pretraining: every token is learned from.
- typed records (DeepSpeed-pipeline trainers such as gdGPT/jllm), ``{"type": ..., ...}``:

  - ``"pretrain"``: ``text``, as plain text;
  - ``"instruct"``: ``instruct`` (+ ``"\n\n" + input`` when non-empty) as the user turn,
    ``output`` as the answer;
  - ``"conversation"``: ``rounds``, a list of ``[role, text]`` pairs, roles ``ask`` (user) and
    ``ans`` (answer), consecutive asks kept as separate user turns;
  - ``"conver_has_api"``: ``api_desc`` as the system part, then ``rounds`` that may also hold
    ``["ans-api", {"actions": [...], "ans": ...}]``: each action is an answer turn (learned)
    ``inner_thought + "\n" + json.dumps({"api_name": ..., "api_param": ...})`` followed by a
    ``tool`` turn holding its ``api_res`` (a string, or JSON text; not learned), and ``ans`` is
    the final answer;
  - ``"ref_qa"``: ``reference`` as the system part, then ``rounds`` as for a conversation.

  An optional ``system`` string comes before ``api_desc``/``reference`` in the system part
  (joined by a blank line).

A record is bad (counted and reported with its line number, never silently dropped) when it is
not JSON / not an object or list, when a round has no role, an unknown role or no string content,
when an answer is empty, when a conversation has no answer or does not end with one, or when an
instruction lacks ``instruction``/``output``.

Output, for ``--output-prefix P`` and key ``K`` (``--json-keys``, default ``text``): three
indexed datasets with one document of one sequence per kept record, in input order,

    P_K_document.{bin,idx}             token ids (uint16 or int32, as pretraining data)
    P_K_loss_mask_document.{bin,idx}   uint8, 1 on the tokens learned from (answers and their EOS)
    P_K_task_ids_document.{bin,idx}    one uint16 per record: its task id

and ``P_K_sft.json`` (task names in id order, token and answer counts per task, the truncation
policy and its counts, the bad records with line numbers). Training takes
``--data-path P_K_document`` and finds the others next to it (:func:`sft_paths`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from megafast.atomic_file import atomic_write

FORMAT = "megafast-sft-1"
DEFAULT_TASK = "default"
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "bot": "assistant",
                "tool": "tool"}
RECORD_TYPES = ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa")
ROUND_ROLES = {"ask": "user", "ans": "assistant"}  # typed records' [role, text] rounds (plus "ans-api")
CONVERSATION_KEYS = ("messages", "chat_rounds", "conversations")
TEXT = "text"  # the role of a plain-text record's single "message"


class BadRecord(ValueError):
    """A record that cannot be used; the message is the one-line reason."""


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool (an API's output, not learned) | text
    content: str


@dataclass(frozen=True)
class Conversation:
    """A parsed record: its messages (a plain-text record is one ``text`` message) and task name."""

    messages: tuple[Message, ...]
    task: str = DEFAULT_TASK

    @property
    def is_text(self) -> bool:
        return len(self.messages) == 1 and self.messages[0].role == TEXT

    @property
    def answers(self) -> list[str]:
        """What is learned from: the assistant turns (or the whole text)."""
        return [m.content for m in self.messages if m.role in ("assistant", TEXT)]


def _task_of(obj: dict[str, Any]) -> str:
    task = obj.get("task", obj.get("data_name", DEFAULT_TASK))
    if not isinstance(task, str) or not task.strip():
        raise BadRecord(f"'task'/'data_name' must be a non-empty string, got {task!r:.40}")
    return task.strip()


def _round(item: Any, number: int) -> Message:
    """One conversation round: {"role", "content"} or {role: content}."""
    if not isinstance(item, dict):
        raise BadRecord(f"message {number} is a {type(item).__name__}, not an object")
    if "role" in item or "content" in item:
        role, content = item.get("role"), item.get("content")
        if role is None:
            raise BadRecord(f"message {number} has no role")
    elif len(item) == 1:
        role, content = next(iter(item.items()))
    else:
        raise BadRecord(f"message {number} has no role (give 'role' and 'content', or one {{role: text}} pair)")
    if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
        raise BadRecord(f"message {number} has unknown role {role!r:.40} (use system, user/human, assistant/bot)")
    role = ROLE_ALIASES[role.strip().lower()]
    if not isinstance(content, str):
        raise BadRecord(f"message {number} ({role}) has no text content")
    return Message(role, content)


def _check_conversation(messages: list[Message]) -> None:
    if not messages:
        raise BadRecord("empty conversation")
    for i, m in enumerate(messages, 1):
        if m.role == "assistant" and not m.content.strip():
            raise BadRecord(f"empty answer in message {i}")
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord("conversation has no answer (no assistant message)")
    if messages[-1].role != "assistant":
        raise BadRecord(f"conversation does not end with an answer (last message is {messages[-1].role})")


def _string(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise BadRecord(f"{what} record without a string '{key}'")
    return value


def _action_text(action: Any, number: int) -> tuple[str, str]:
    """(learned call text, tool output text) of one ``ans-api`` action."""
    if not isinstance(action, dict) or not isinstance(action.get("api_name"), str):
        raise BadRecord(f"ans-api action {number} is not an object with a string 'api_name'")
    thought = action.get("inner_thought", "")
    if not isinstance(thought, str):
        raise BadRecord(f"ans-api action {number}: 'inner_thought' must be a string")
    call = json.dumps({"api_name": action["api_name"], "api_param": action.get("api_param", "")}, ensure_ascii=False)
    result = action.get("api_res", "")
    result = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return (f"{thought}\n{call}" if thought else call), result


def _typed_rounds(rounds: Any) -> list[Message]:
    """``rounds`` of [role, text] pairs (ask / ans / ans-api) -> messages."""
    if not isinstance(rounds, list) or not rounds:
        raise BadRecord("'rounds' must be a non-empty list of [role, text] pairs")
    out: list[Message] = []
    for i, pair in enumerate(rounds, 1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise BadRecord(f"round {i} is not a [role, text] pair")
        role, value = pair
        if role == "ans-api":
            if not isinstance(value, dict) or not isinstance(value.get("actions"), list):
                raise BadRecord(f"round {i} (ans-api) needs an object with an 'actions' list")
            for j, action in enumerate(value["actions"], 1):
                call, result = _action_text(action, j)
                out += [Message("assistant", call), Message("tool", result)]
            if not isinstance(value.get("ans"), str):
                raise BadRecord(f"round {i} (ans-api) has no string 'ans'")
            out.append(Message("assistant", value["ans"]))
        elif role in ROUND_ROLES:
            if not isinstance(value, str):
                raise BadRecord(f"round {i} ({role}) has no text")
            out.append(Message(ROUND_ROLES[role], value))
        else:
            raise BadRecord(f"round {i} has unknown role {role!r:.40} (use ask, ans or ans-api)")
    return out


def _typed_record(obj: dict[str, Any], task: str) -> Conversation:
    """A ``{"type": ...}`` record (module docstring)."""
    kind = obj["type"]
    if kind not in RECORD_TYPES:
        raise BadRecord(f"unknown record type {kind!r:.40} (use {', '.join(RECORD_TYPES)})")
    if kind == "pretrain":
        text = _string(obj, "text", "pretrain")
        if not text.strip():
            raise BadRecord("'text' must be a non-empty string")
        return Conversation((Message(TEXT, text),), task)
    if kind == "instruct":
        prompt = _string(obj, "instruct", "instruct")
        output = _string(obj, "output", "instruct")
        extra = obj.get("input", "")
        if extra is not None and not isinstance(extra, str):
            raise BadRecord("'input' must be a string")
        if not output.strip():
            raise BadRecord("empty answer ('output')")
        prompt += f"\n\n{extra}" if extra and extra.strip() else ""
        messages = [Message("user", prompt), Message("assistant", output)]
    else:
        messages = _typed_rounds(obj.get("rounds"))
    system = [obj["system"]] if isinstance(obj.get("system"), str) and obj["system"].strip() else []
    context = {"conver_has_api": "api_desc", "ref_qa": "reference"}.get(kind)
    if context is not None:
        system.append(_string(obj, context, kind))
    if system:
        messages.insert(0, Message("system", "\n\n".join(system)))
    _check_conversation(messages)
    return Conversation(tuple(messages), task)


def parse_record(obj: Any) -> Conversation:
    """The conversation of one decoded JSON line (see the module docstring); BadRecord if unusable."""
    if isinstance(obj, list):
        messages = [_round(item, i) for i, item in enumerate(obj, 1)]
        _check_conversation(messages)
        return Conversation(tuple(messages))
    if not isinstance(obj, dict):
        raise BadRecord(f"not a JSON object or list (a {type(obj).__name__})")
    task = _task_of(obj)
    if "type" in obj:
        return _typed_record(obj, task)
    key = next((k for k in CONVERSATION_KEYS if k in obj), None)
    if key is not None:
        rounds = obj[key]
        if not isinstance(rounds, list):
            raise BadRecord(f"'{key}' must be a list of messages, got a {type(rounds).__name__}")
        messages = [_round(item, i) for i, item in enumerate(rounds, 1)]
        _check_conversation(messages)
        return Conversation(tuple(messages), task)
    if "instruction" in obj or "output" in obj:
        return Conversation(_instruction(obj), task)
    if TEXT in obj:
        text = obj[TEXT]
        if not isinstance(text, str) or not text.strip():
            raise BadRecord("'text' must be a non-empty string")
        return Conversation((Message(TEXT, text),), task)
    raise BadRecord(f"no {'/'.join(CONVERSATION_KEYS)}, instruction/output or text field")


def _instruction(obj: dict[str, Any]) -> tuple[Message, ...]:
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise BadRecord(f"instruction record without a string '{key}'")
    extra = obj.get("input", "")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord("'input' must be a string")
    if not obj["output"].strip():
        raise BadRecord("empty answer ('output')")
    prompt = obj["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    messages = [Message("user", prompt), Message("assistant", obj["output"])]
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, Message("system", system))
    return tuple(messages)


# ---- output files ----


@dataclass(frozen=True)
class SFTPaths:
    """The files of one SFT dataset, named from its token dataset prefix ``P_K_document``."""

    tokens: str  # P_K_document
    loss_mask: str  # P_K_loss_mask_document
    task_ids: str  # P_K_task_ids_document
    info: str  # P_K_sft.json


def sft_paths(token_prefix: str) -> SFTPaths:
    """Names of the sibling files of an SFT token dataset (``--data-path`` prefix)."""
    base = token_prefix.removesuffix("_document")
    return SFTPaths(token_prefix, f"{base}_loss_mask_document", f"{base}_task_ids_document", f"{base}_sft.json")


def write_info(path: str, info: dict[str, Any]) -> None:
    """Write the sidecar JSON (atomically: a temporary name, then a rename)."""
    atomic_write(path, lambda f: f.write(json.dumps({"format": FORMAT, **info}, indent=2).encode()))


def read_info(token_prefix: str) -> dict[str, Any]:
    """The sidecar JSON of an SFT dataset; ValueError (one line) when it is missing or not ours."""
    path = sft_paths(token_prefix).info
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: {token_prefix} is not an SFT dataset; make it with "
                         "tools/preprocess_data.py --dataset-type sft (or train with --dataset-type gpt)")
    with open(path, encoding="utf-8") as f:
        try:
            info = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): re-run the SFT preprocessing") from None
    if info.get("format") != FORMAT or not isinstance(info.get("tasks"), list):
        raise ValueError(f"{path} is not a {FORMAT} file: re-run tools/preprocess_data.py --dataset-type sft")
    return info
