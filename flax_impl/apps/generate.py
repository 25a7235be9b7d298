"""`flax-impl generate PATH --prompt TEXT`: text from a local Hugging Face folder of a causal language model.

The folder holds config.json, the safetensors weights and the tokenizer's own tokenizer.json (read with the
`tokenizers` library; nothing is downloaded). Each prompt is encoded as `Tokenizer.encode(text)` does (special
tokens such as a BOS included, as `transformers` tokenizers do), the prompts run as one left-padded batch through
`flax_impl.generate` (the KV-cache decode loop compiled as one program), and the text goes to stdout: with
one prompt it streams as the tokens are chosen; with several, each prompt's text is printed when the batch is done.
Timing goes to stderr.

Decoding is greedy unless a sampling option (--temperature, --top-k, --top-p, --seed) is given. Generation stops
at --max-new-tokens or at a stop token: the folder's eos_token_id (generation_config.json, else config.json)
unless --stop-token or --ignore-eos says otherwise.

Every option is checked before the weights are read (exit status 2, the message naming the option), and so are the
folder's files: config.json's values, the tokenizer, the safetensors headers (a truncated or corrupt file is named).
Ctrl-C stops the command with one line on stderr and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.apps import args as shared

TOKENIZER = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_NEW_TOKENS = 64
# Pieces of a multi-byte character decode to U+FFFD until the character is complete: held back while streaming.
REPLACEMENT = "\ufffd"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl generate` options."""
    a = parser.add_argument
    a("path", metavar="PATH", help="local Hugging Face folder: config.json, safetensors weights, tokenizer.json")
    a("--prompt", action="append", required=True, metavar="TEXT",
      help="text to continue; repeat for a batch of prompts (several prompts print when all are done)")
    a("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="N",
      help=f"tokens to generate at most per prompt [{DEFAULT_NEW_TOKENS}]")
    a("--greedy", action="store_true", help="greedy decoding (the default when no sampling option is given)")
    a("--temperature", type=float, metavar="T", help="sample with this temperature > 0 [1.0 when sampling]")
    a("--top-k", type=int, metavar="K", help="sample from the K most likely tokens; 0 = all [0]")
    a("--top-p", type=float, metavar="P", help="sample from the smallest set of tokens of probability >= P, "
      "0 < P <= 1 [1.0]")
    a("--seed", type=int, metavar="S", help="seed of the sampling, in [0, 2**32) (turns sampling on) [0]")
    a("--stop-token", type=int, action="extend", nargs="+", metavar="ID",
      help="stop a prompt at these token ids [the folder's eos_token_id]")
    a("--ignore-eos", action="store_true", help="do not stop at the folder's eos_token_id")


@dataclass
class Plan:
    """What `run` checked before any weight is read."""

    folder: Path
    config: Any  # TransformerConfig
    tokenizer: Any  # tokenizers.Tokenizer
    prompt_ids: list[list[int]]
    sampling: dict[str, Any]
    stop_tokens: tuple[int, ...]
    pad_id: int
    notes: list[str] = field(default_factory=list)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keywords of `generate` from --greedy / --temperature / --top-k / --top-p / --seed, checked by
    `GenerationConfig` (the library's own rules: finite temperature, a seed that jax.random.key holds, ...).

    Raises:
        ValueError: --greedy together with a sampling option, or a value outside its range, naming the option.
    """
    from flax_impl.generation_config import GenerationConfig

    given = [name for name in ("temperature", "top_k", "top_p", "seed") if getattr(args, name) is not None]
    if args.greedy and given:
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(f"--greedy cannot be combined with the sampling options {names}")
    if not given:
        return {"do_sample": False}
    temperature = 1.0 if args.temperature is None else args.temperature
    top_k = 0 if args.top_k is None else args.top_k
    top_p = 1.0 if args.top_p is None else args.top_p
    if not temperature > 0:
        raise ValueError(f"--temperature={temperature} must be > 0 when sampling (use --greedy for argmax)")
    if top_k < 0:
        raise ValueError(f"--top-k={top_k} must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p={top_p} must be in (0, 1]")
    seed = 0 if args.seed is None else args.seed
    options = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    try:
        GenerationConfig(max_new_tokens=1, **options)
    except ValueError as err:  # "temperature=inf must be ..." -> "--temperature=inf must be ..."
        raise ValueError(f"--{str(err).replace('_', '-', 1)}") from None
    return options


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`.

    Raises:
        ValueError: no tokenizer.json, or one the tokenizers library cannot read.
    """
    from tokenizers import Tokenizer

    path = folder / TOKENIZER
    if not path.is_file():
        raise ValueError(f"PATH {str(folder)!r} has no {TOKENIZER} (the tokenizer must come with the model folder)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a tokenizers file: {err}") from err


def _ids(value: Any, where: str) -> list[int]:
    """An eos_token_id field (an int, a list of ints, or null) as a list.

    Raises:
        ValueError: any other value (a "2", a true, a list holding one), naming `where`.
    """
    from flax_impl.validation import check_json_kind

    if isinstance(value, list):
        for i, v in enumerate(value):
            check_json_kind(f"{where}[{i}]", v, "int")
        return list(value)
    check_json_kind(where, value, "int?")
    return [] if value is None else [value]


def eos_ids(folder: Path, hf: dict[str, Any]) -> list[int]:
    """The folder's end-of-sequence ids: generation_config.json's eos_token_id, else config.json's.

    Raises:
        ValueError: generation_config.json is not a JSON object, or an eos_token_id is not an id or a list of
            ids, naming the file.
    """
    from flax_impl.hf.io import CONFIG, read_json

    path = folder / GENERATION_CONFIG
    if path.is_file():
        gen = read_json(path)
        if not isinstance(gen, dict):
            raise ValueError(f"{path} holds a JSON {type(gen).__name__}, not an object")
        ids = _ids(gen.get("eos_token_id"), f"{path}: eos_token_id")
        if ids:
            return ids
    return _ids(hf.get("eos_token_id"), f"{folder / CONFIG}: eos_token_id")


def require_tokenizers() -> None:
    """ValueError with the install line when the `tokenizers` package is absent (it is in the [hf] extra)."""
    if importlib.util.find_spec("tokenizers") is None:
        raise ValueError("it needs the tokenizers package: pip install tokenizers (or pip install -e '.[hf]')")


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every option and read the folder's config and tokenizer; no weight is read.

    Raises:
        ValueError / FileNotFoundError: naming the option or the file, the bad value and what is allowed.
    """
    from flax_impl.hf.convert import config_from_hf
    from flax_impl.hf.io import CONFIG, cast_warning, read_config, read_headers, weight_files

    require_tokenizers()
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    sampling = sampling_options(args)
    for i, text in enumerate(args.prompt):
        if not text:
            raise ValueError(f"--prompt {text!r} (prompt {i + 1}) is empty; give text to continue")
    folder = Path(args.path)
    hf = read_config(folder)
    fam, config = config_from_hf(hf, source=str(folder / CONFIG))
    if not config.causal:
        raise ValueError(f"PATH {str(folder)!r} holds a {fam.model_type} model, which is not causal: generate needs "
                         "a causal language model (gpt2, llama, mistral, qwen2, bloom, mpt)")
    header = read_headers(weight_files(folder))  # a truncated or corrupt file fails here, before any weight is read
    tokenizer = load_tokenizer(folder)
    V = config.vocab_size
    prompt_ids = []
    for i, text in enumerate(args.prompt):
        ids = tokenizer.encode(text).ids
        if not ids:
            raise ValueError(f"--prompt {text!r} (prompt {i + 1}) encodes to no tokens")
        if max(ids) >= V:
            raise ValueError(f"--prompt {text!r}: {TOKENIZER} gives id {max(ids)}, outside the model's vocabulary "
                             f"of {V} (the tokenizer does not belong to this model)")
        if len(ids) >= config.max_len:
            raise ValueError(f"--prompt (prompt {i + 1}) is {len(ids)} tokens; the model's maximum length is "
                             f"{config.max_len}, so a prompt may have at most {config.max_len - 1}")
        if len(ids) + args.max_new_tokens > config.max_len:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} after prompt {i + 1} of {len(ids)} tokens "
                             f"passes the model's maximum length {config.max_len}: allowed at most "
                             f"{config.max_len - len(ids)}")
        prompt_ids.append(ids)
    notes = []
    cast = cast_warning({k: v[2] for k, v in header.items()}, "float32", str(folder))
    dtypes = sorted({v[2] for v in header.values() if v[2] in ("F64", "F32", "BF16", "F16")})
    if cast is not None:
        notes.append(cast)
    elif dtypes not in ([], ["F32"]):
        notes.append(f"weights stored as {'/'.join(dtypes)}, widened to float32 parameters (every value kept)")
    if args.stop_token:
        bad = [t for t in args.stop_token if not 0 <= t < V]
        if bad:
            raise ValueError(f"--stop-token {bad} outside the vocabulary: ids must be in [0, {V})")
        stop = tuple(dict.fromkeys(args.stop_token))
    elif args.ignore_eos:
        stop = ()
    else:
        stop = tuple(t for t in eos_ids(folder, hf) if 0 <= t < V)
        notes.append(f"stop tokens {list(stop)} (the folder's eos_token_id)" if stop else "no stop token")
    pad = hf.get("pad_token_id")  # its kind is checked by read_config where the family reads it
    pad_id = pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < V else 0
    return Plan(folder, config, tokenizer, prompt_ids, sampling, stop, pad_id, notes)


def continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text that `new_ids` add after the prompt: decode(prompt + new) minus decode(prompt).

    Decoding the prompt with the new tokens keeps what the decoder puts between them (a word-level tokenizer's
    space, a SentencePiece word boundary); where the decoder rewrites the prompt's text, the new tokens alone.
    """
    base = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(base):] if full.startswith(base) else tokenizer.decode(list(new_ids))


class TextStream:
    """Writes the text of one prompt's new tokens as they come.

    Each token re-decodes the prompt and every new token so far (`continuation`) and writes what is new; a
    trailing U+FFFD (the first bytes of a character split over byte-level tokens) is held until the character is
    complete, so a multi-byte character is written whole. `finish` writes what is left of the final text.

    Args:
        tokenizer: a `tokenizers.Tokenizer`.
        prompt_ids: the prompt's ids.
        write: where text goes (e.g. `sys.stdout.write`); flushed by the caller's stream.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], write: Callable[[str], Any]):
        self.tokenizer, self.prompt_ids, self.write = tokenizer, list(prompt_ids), write
        self.new_ids: list[int] = []
        self.written = ""
        self.times: list[float] = []

    def push(self, token: int) -> None:
        """One more token: write the text it completes."""
        self.times.append(time.perf_counter())
        self.new_ids.append(int(token))
        text = continuation(self.tokenizer, self.prompt_ids, self.new_ids).rstrip(REPLACEMENT)
        if len(text) > len(self.written) and text.startswith(self.written):
            self._emit(text[len(self.written):])

    def finish(self, new_ids: list[int]) -> str:
        """Write the rest of the text of `new_ids` (the tokens generate returned); returns the whole text.

        Raises:
            RuntimeError: the text already written is not a prefix of the final text (the tokenizer's decoder
                rewrote an earlier piece), so the stream cannot be completed exactly.
        """
        text = continuation(self.tokenizer, self.prompt_ids, new_ids)
        if not text.startswith(self.written):
            raise RuntimeError(f"streamed {self.written!r}, but the final text is {text!r}")
        self._emit(text[len(self.written):])
        return text

    def _emit(self, piece: str) -> None:
        if piece:
            self.write(piece)
            self.written += piece


def run(args: argparse.Namespace) -> int:
    """Load the folder, generate, print the text on stdout and the timing on stderr. Returns the exit status
    (2: bad input, a file that cannot be read; 130: interrupted by Ctrl-C)."""
    streaming: list[bool] = []  # appended to once the text on stdout is an open line
    try:
        return _run(args, streaming)
    except KeyboardInterrupt:
        if streaming:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print("flax-impl generate: interrupted (Ctrl-C); nothing more is generated", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, streaming: list[bool]) -> int:
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        return shared.fail("generate", err)

    import flax_impl.hf
    from flax_impl.generation import generate

    start = time.perf_counter()
    try:
        _, model = flax_impl.hf.from_pretrained(plan.folder)
    except (ValueError, OSError) as err:  # a tensor that cannot be read, a folder changed since the plan
        return shared.fail("generate", err)
    loaded = time.perf_counter() - start
    out_stream = sys.stdout
    stream = None
    if len(plan.prompt_ids) == 1:
        stream = TextStream(plan.tokenizer, plan.prompt_ids[0], lambda s: (out_stream.write(s), out_stream.flush()))
        out_stream.write(args.prompt[0])
        out_stream.flush()
        streaming.append(True)
    start = time.perf_counter()
    out = generate(model, plan.prompt_ids, max_new_tokens=args.max_new_tokens, stop_tokens=plan.stop_tokens,
                   pad_id=plan.pad_id, on_token=None if stream is None else (lambda t: stream.push(t[0])),
                   **plan.sampling)
    end = time.perf_counter()
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    if stream is not None:
        stream.finish(tokens[0, : lengths[0]].tolist())
        out_stream.write("\n")
    else:
        for i, (text, ids) in enumerate(zip(args.prompt, plan.prompt_ids, strict=True)):
            new = continuation(plan.tokenizer, ids, tokens[i, : lengths[i]].tolist())
            out_stream.write(("\n" if i else "") + text + new + "\n")
    out_stream.flush()
    _report_timing(plan, stream, loaded, start, end, lengths)
    return 0


def _report_timing(plan: Plan, stream: TextStream | None, loaded: float, start: float, end: float,
                   lengths: np.ndarray) -> None:
    """stderr: load time, time to the first token (compile + prefill on this first call), decode tokens/s."""
    B, generated = len(plan.prompt_ids), int(lengths.sum())
    mode = "greedy" if not plan.sampling["do_sample"] else ", ".join(
        f"{k}={v}" for k, v in plan.sampling.items() if k != "do_sample")
    lines = [f"model loaded in {loaded:.2f} s; {B} prompt(s) of {[len(p) for p in plan.prompt_ids]} tokens; {mode}"]
    lines += plan.notes
    if stream is not None and stream.times:
        first = stream.times[0] - start
        rest = end - stream.times[0]
        after = len(stream.times) - 1
        rate = f"{after / rest:.1f} tokens/s" if after and rest > 0 else "-"
        lines.append(f"first token after {first:.2f} s (this first call includes tracing and compiling); "
                     f"then {after} tokens in {rest:.2f} s: {rate}")
    else:
        lines.append(f"{generated} tokens ({B} x up to {int(lengths.max())}) in {end - start:.2f} s, compile "
                     f"included: {generated / (end - start):.1f} tokens/s")
    print("\n".join(f"flax-impl generate: {line}" for line in lines), file=sys.stderr)
