"""A folder's chat template and special tokens, rendered as transformers renders them (`apply_chat_template`).

Where the template comes from (transformers' order): `chat_template.jinja` in the folder (with any
`additional_chat_templates/*.jinja`, the file being the "default" one), else `tokenizer_config.json`'s
`chat_template` (a string, or a list of {"name", "template"} with a "default"). The special-token strings the
template reads (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`) come
from tokenizer_config.json (a string, or an AddedToken dict's "content"), else from the legacy
special_tokens_map.json.

Rendering uses transformers' Jinja environment (transformers.utils.chat_template_utils, checked against the
installed one in tests/test_finetune_data.py): an `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with the loop-controls extension and the `{% generation %}` block, a `tojson` filter that
does not escape HTML, and the globals `raise_exception`, `strftime_now`, `dict` and `namespace` (which refuses
underscore names). Messages are passed as `messages`, with `add_generation_prompt` and the special-token strings;
keys whose value is None are dropped first, as transformers does. jinja2 >= 3.1.6 is needed (older releases have
sandbox escapes); it is imported only when a template is rendered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATE_FILE, TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MIN_JINJA = (3, 1, 6)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent. Raises ValueError naming the file when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def load_chat_template(folder: str | Path) -> str | None:
    """The folder's default chat template, or None if it has none.

    Args:
        folder: a Hugging Face folder.

    Returns:
        The Jinja source.

    Raises:
        ValueError: tokenizer_config.json is malformed, or holds several named templates and no "default".
    """
    folder = Path(folder)
    path = folder / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    extra = sorted((folder / TEMPLATE_DIR).glob("*.jinja")) if (folder / TEMPLATE_DIR).is_dir() else []
    named = {p.stem: p.read_text(encoding="utf-8") for p in extra}
    value = _read_json(folder / TOKENIZER_CONFIG).get("chat_template")
    if not named and value is None:
        return None
    if isinstance(value, str) and not named:
        return value
    if isinstance(value, list):
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"),
                                                                                                  str)):
                raise ValueError(f"{folder / TOKENIZER_CONFIG}: chat_template list entries must be "
                                 f"{{'name': str, 'template': str}}, got {item!r:.80}")
            named.setdefault(item["name"], item["template"])
    elif value is not None and not isinstance(value, str):
        raise ValueError(f"{folder / TOKENIZER_CONFIG}: chat_template must be a string or a list of named "
                         f"templates, got {type(value).__name__}")
    if "default" not in named:
        raise ValueError(f"{folder} has several chat templates {sorted(named)} and none named 'default'")
    return named["default"]


def special_tokens(folder: str | Path) -> dict[str, str]:
    """The special-token strings a chat template reads, e.g. {"bos_token": "<s>", "eos_token": "</s>"}.

    Args:
        folder: a Hugging Face folder.

    Returns:
        The named tokens that the folder sets (tokenizer_config.json first, then special_tokens_map.json).
    """
    folder = Path(folder)
    found: dict[str, str] = {}
    for source in (_read_json(folder / TOKENIZER_CONFIG), _read_json(folder / SPECIAL_TOKENS_MAP)):
        for name in SPECIAL_TOKENS:
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and name not in found:
                found[name] = value
    return found


def _jinja() -> Any:
    try:
        import jinja2
    except ImportError:
        raise ValueError("chat templates need jinja2 >= 3.1.6: pip install 'jinja2>=3.1.6'") from None
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise ValueError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox escapes), found "
                         f"{jinja2.__version__}: pip install -U 'jinja2>=3.1.6'")
    return jinja2


class ChatTemplate:
    """A compiled chat template: `render(messages, add_generation_prompt)` -> (text, spans of `{% generation %}`).

    Args:
        source: the Jinja source.
        tokens: the special-token strings passed to the template (`special_tokens`).

    Raises:
        ValueError: jinja2 missing or too old; a template that does not compile (the Jinja error).
    """

    def __init__(self, source: str, tokens: Mapping[str, str] | None = None):
        self.source, self.tokens = source, dict(tokens or {})
        self._tracking: list[tuple[int, int]] | None = None
        self._pieces: list[str] | None = None
        self.template = self._compile(source)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> tuple[str, list]:
        """The rendered text, and the (start, end) character spans of its `{% generation %}` blocks.

        Raises:
            ValueError: the template raised (its `raise_exception`, or a Jinja error), with its message.
        """
        jinja2 = _jinja()
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        chat = [_alias_reasoning(m) for m in chat]
        spans: list[tuple[int, int]] = []
        try:
            with self._track(spans) as pieces:
                for piece in self.template.generate(messages=chat, tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt, **self.tokens):
                    pieces.append(piece)
                text = "".join(pieces)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template failed: {err}") from None
        return text, spans

    @contextmanager
    def _track(self, spans: list[tuple[int, int]]) -> Any:
        self._tracking, self._pieces = spans, []
        try:
            yield self._pieces
        finally:
            self._tracking, self._pieces = None, None

    def _generation(self, caller: Any) -> str:
        text = caller()
        if self._tracking is not None and self._pieces is not None:
            start = len("".join(self._pieces))
            self._tracking.append((start, start + len(text)))
        return text

    def _compile(self, source: str) -> Any:
        jinja2 = _jinja()
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        owner = self

        class Generation(Extension):  # transformers' AssistantTracker: marks the assistant's text
            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_support"), [], [], body).set_lineno(lineno)

            def _support(self, caller: Any) -> str:
                return owner._generation(caller)

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class TemplateDict:
            def __call__(self, *args: Any, **kwargs: Any) -> dict:
                return dict(*args, **kwargs)

            def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
                return dict.fromkeys(*args, **kwargs)

        class TemplateNamespace(jinja2.utils.Namespace):
            def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    TemplateNamespace._check(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name: str, value: Any) -> None:
                TemplateNamespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name: Any) -> None:
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes: {name!r}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.globals["dict"] = TemplateDict()
        env.globals["namespace"] = TemplateNamespace
        try:
            return env.from_string(source)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template does not compile: {err}") from None


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """transformers' aliasing: a message's reasoning under any of its names is also `thinking` and
    `reasoning_content`."""
    reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}
