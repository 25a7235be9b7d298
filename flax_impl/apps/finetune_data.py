"""What `flax-impl finetune` trains on: the data file read, checked and tokenized into examples, before any work.

Formats (by the file's suffix):
- `.txt`: one text, tokenized whole (`Tokenizer.encode(text)`: the tokenizer's special tokens, e.g. a BOS,
  included), the folder's EOS appended, cut into windows of seq_len + 1 tokens that overlap by one token (every
  token is predicted once); the loss counts every token.
- `.jsonl`: one JSON object per line (blank lines skipped), each one of
  - {"messages": [{"role": ..., "content": ...}, ...]}: a chat, rendered with the folder's chat template
    (`flax_impl.apps.finetune_template`, as transformers' `apply_chat_template`) and tokenized without adding
    special tokens (the template writes them); the loss counts the assistant messages' tokens only;
  - {"prompt": ..., "completion": ...}: strings: the text prompt + completion, tokenized as plain text with the
    EOS appended, the loss on the completion (and the EOS) only; or lists of messages (a conversational prompt and
    its completion messages): rendered with the chat template, the loss on the completion messages;
  - {"text": ...}: a plain document, the EOS appended, the loss on every token.

Which tokens are a chat's completion: a template with `{% generation %}` blocks marks them itself (as
transformers' `return_assistant_tokens_mask`); otherwise each trained message's text is the difference between
the chat rendered up to it (with the generation prompt, for an assistant message) and the chat rendered through
it, which must be prefixes of the whole rendering (a template that renders earlier turns differently once later
ones follow is refused). A token is trained when its characters overlap a trained span (the tokenizer's offsets),
so a turn's end-of-turn token is learned too.

An example is (ids, trained): ids (n,) and trained (n,) bool; the model reads ids[:-1] and predicts ids[1:],
counting target k when trained[k + 1].

Bad data is a ValueError naming the file, the line and what was expected: an empty file or no record; a line that
is not a JSON object; a record without the fields above; a chat without a template; a record longer than the
row (seq_len + 1 tokens) or than the model's maximum; a record with nothing to train; text the tokenizer maps to
its unknown token; an id outside the model's vocabulary (a tokenizer that is not the model's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.apps.finetune_template import ChatTemplate

SUFFIXES = (".txt", ".jsonl")


@dataclass
class Example:
    """One tokenized record: ids (n,) int32 and trained (n,) bool (the tokens the loss counts); `where` names it
    (file:line) for error messages."""

    ids: np.ndarray
    trained: np.ndarray
    where: str


@dataclass
class Tokens:
    """How text becomes ids: the folder's tokenizer, its EOS id (or None), chat template (or None), the model's
    vocabulary size V; `unk_id` is the tokenizer model's unknown token (None if it has none)."""

    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int | None
    template: ChatTemplate | None
    vocab_size: int
    unk_id: int | None = None

    def __post_init__(self) -> None:
        if self.unk_id is None:
            unk = json.loads(self.tokenizer.to_str()).get("model", {}).get("unk_token")
            self.unk_id = None if unk is None else self.tokenizer.token_to_id(unk)


def records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a .jsonl file.

    Raises:
        ValueError: a line that is not JSON, or not a JSON object.
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object, got {type(record).__name__}")
            yield n, record


def _messages(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    """Check a list of {"role": str, "content": ...} messages."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of messages, got {value!r:.60}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            raise ValueError(f"{where}: {field}[{i}] must be an object with 'role' (a string) and 'content', "
                             f"got {m!r:.80}")
    return value


def _encode(tok: Tokens, text: str, where: str, *, special: bool) -> Any:
    """tokenizers' Encoding of `text`, its ids checked against the vocabulary and the unknown token."""
    enc = tok.tokenizer.encode(text, add_special_tokens=special)
    ids = np.asarray(enc.ids, np.int64)
    if ids.size and ids.max() >= tok.vocab_size:
        raise ValueError(f"{where}: the tokenizer gives id {int(ids.max())}, outside the model's vocabulary of "
                         f"{tok.vocab_size} (the folder's tokenizer.json does not belong to its model)")
    unk = tok.unk_id
    if unk is not None and (ids == unk).any():
        k = int(np.argmax(ids == unk))
        a, b = enc.offsets[k]
        raise ValueError(f"{where}: the tokenizer has no token for {text[a:b]!r} (character {a}; it becomes the "
                         f"unknown token, id {unk}): clean the text or use a tokenizer that covers it")
    return enc


def _trained_by_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """(n,) bool: token k overlaps a span (start <= ... < end), as transformers' assistant mask."""
    out = np.zeros(len(offsets), bool)
    for k, (a, b) in enumerate(offsets):
        out[k] = any(b > s and a < e for s, e in spans if e > s)
    return out


def _append_eos(tok: Tokens, ids: np.ndarray, trained: np.ndarray, train_eos: bool) -> tuple[np.ndarray, np.ndarray]:
    if tok.eos_id is None or (ids.size and ids[-1] == tok.eos_id):
        return ids, trained
    return np.append(ids, tok.eos_id), np.append(trained, train_eos)


def chat_spans(template: ChatTemplate, messages: list[dict[str, Any]], train: list[bool], where: str) -> tuple:
    """(text, trained character spans) of a chat whose messages `train` marks.

    Raises:
        ValueError: the template fails, or renders a prefix of the chat as other than a prefix of the whole.
    """
    text, marked = template.render(messages)
    if marked:  # the template marks the assistant's text itself
        return text, marked
    spans = []
    for k, (message, on) in enumerate(zip(messages, train, strict=True)):
        if not on:
            continue
        before, _ = template.render(messages[:k], add_generation_prompt=message["role"] == "assistant")
        through, _ = template.render(messages[: k + 1])
        for part, name in ((before, f"the chat up to message {k}"), (through, f"the chat through message {k}")):
            if not text.startswith(part):
                raise ValueError(
                    f"{where}: the chat template renders {name} as other than the start of the whole chat, so the "
                    "completion tokens cannot be found (a template that rewrites earlier turns; mark them with "
                    "{% generation %} blocks in --chat-template)"
                )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize(record: dict[str, Any], tok: Tokens, where: str) -> Example:
    """One .jsonl record -> an Example (module docstring).

    Raises:
        ValueError: a record without the expected fields, a chat without a template, unknown tokens, ids outside
            the vocabulary, nothing to train.
    """
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        train = [m["role"] == "assistant" for m in messages]
        return _chat(tok, messages, train, where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
            return _chat(tok, messages, [k >= len(prompt) for k in range(len(messages))], where)
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages, "
                             f"got {type(prompt).__name__} and {type(completion).__name__}")
        if not completion:
            raise ValueError(f"{where}: 'completion' is empty: nothing to train")
        enc = _encode(tok, prompt + completion, where, special=True)
        trained = _trained_by_spans(enc.offsets, [(len(prompt), len(prompt) + len(completion))])
        ids, trained = _append_eos(tok, np.asarray(enc.ids, np.int64), trained, True)
        return _example(ids, trained, where)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string, got {record['text']!r:.60}")
        enc = _encode(tok, record["text"], where, special=True)
        ids = np.asarray(enc.ids, np.int64)
        ids, trained = _append_eos(tok, ids, np.ones(ids.shape, bool), True)
        return _example(ids, trained, where)
    raise ValueError(f"{where}: a record needs 'messages', 'prompt' and 'completion', or 'text'; it has "
                     f"{sorted(record)[:8]}")


def _chat(tok: Tokens, messages: list[dict[str, Any]], train: list[bool], where: str) -> Example:
    if tok.template is None:
        raise ValueError(f"{where}: a chat record needs a chat template, and the folder has none "
                         "(chat_template.jinja or tokenizer_config.json's chat_template): give --chat-template FILE")
    if not any(train):
        raise ValueError(f"{where}: the chat has no assistant (completion) message: nothing to train")
    text, spans = chat_spans(tok.template, messages, train, where)
    enc = _encode(tok, text, where, special=False)
    return _example(np.asarray(enc.ids, np.int64), _trained_by_spans(enc.offsets, spans), where)


def _example(ids: np.ndarray, trained: np.ndarray, where: str) -> Example:
    if not trained[1:].any():
        raise ValueError(f"{where}: no token of the completion remains after tokenizing: nothing to train")
    return Example(ids.astype(np.int32), trained, where)


def read_examples(path: str | Path, tok: Tokens, *, seq_len: int, max_len: int) -> list[Example]:
    """Every example of the data file, checked against the row length seq_len + 1 and the model's `max_len`.

    Args:
        path: a .txt or .jsonl file.
        tok: the tokenizer, EOS, template and vocabulary size.
        seq_len: the model's input length per row (L).
        max_len: the model's maximum length (positions).

    Returns:
        The examples in file order (a .txt file: its windows).

    Raises:
        ValueError: bad data (module docstring), naming the file and line.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"--data {str(path)!r}: expected a .txt or .jsonl file")
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r} is not a file")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"--data {str(path)!r} is empty")
        enc = _encode(tok, text, str(path), special=True)
        ids = np.asarray(enc.ids, np.int64)
        ids, _ = _append_eos(tok, ids, np.ones(ids.shape, bool), True)
        if ids.size < 2:
            raise ValueError(f"--data {str(path)!r} tokenizes to {ids.size} token: at least 2 are needed")
        starts = range(0, ids.size - 1, seq_len)
        return [Example(ids[s : s + seq_len + 1].astype(np.int32), np.ones(min(seq_len + 1, ids.size - s), bool),
                        f"{path} tokens {s}..{min(s + seq_len + 1, ids.size)}") for s in starts]
    out = []
    for n, record in records(path):
        where = f"{path}:{n}"
        example = tokenize(record, tok, where)
        n_tokens = example.ids.size
        if n_tokens - 1 > max_len:
            raise ValueError(f"{where}: {n_tokens} tokens, longer than the model's maximum ({max_len} + 1); "
                             "shorten or split the record")
        if n_tokens - 1 > seq_len:
            raise ValueError(f"{where}: {n_tokens} tokens, longer than a row of --seq-len {seq_len} (+ 1): raise "
                             f"--seq-len (the model allows up to {max_len}) or shorten the record")
        out.append(example)
    if not out:
        raise ValueError(f"--data {str(path)!r} holds no record")
    return out
