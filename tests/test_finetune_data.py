"""What `flax-impl finetune` trains on: chat templates rendered and tokenized as transformers' apply_chat_template
does (text, ids, and the assistant mask of a template with {% generation %} blocks), the completion-only loss,
padded and packed rows (a packed example computes what it computes alone), and every kind of bad data refused
with the file and line named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from finetune_helpers import CHATML, CHATS, make_folder, train_tokenizer, write_jsonl

from flax_impl.apps.finetune_batches import eval_batches, pack_rows, pad_rows, split_heldout, step_batch
from flax_impl.apps.finetune_data import Tokens, read_examples, tokenize
from flax_impl.apps.finetune_template import ChatTemplate, load_chat_template, special_tokens
from flax_impl.validation import IGNORE_INDEX

# ChatML with the assistant's turn marked: what transformers' return_assistant_tokens_mask reads.
CHATML_MARKED = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_RECORDS = [r for r in CHATS if "messages" in r]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ft-data") / "llama", "llama")


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def tokens(folder, template=CHATML):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return Tokens(tok, 1, None if template is None else ChatTemplate(template, special_tokens(folder)), 300)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_renders_and_tokenizes_as_transformers(folder, hf_tokenizer, generation_prompt):
    template = ChatTemplate(load_chat_template(folder), special_tokens(folder))
    tok = tokens(folder)
    for record in CHAT_RECORDS:
        messages = record["messages"][:-1] if generation_prompt else record["messages"]
        text, _ = template.render(messages, add_generation_prompt=generation_prompt)
        want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert text == want
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tok.tokenizer.encode(text, add_special_tokens=False).ids == list(ids)
    assert text.startswith("<s>")  # the template writes the BOS; encoding adds none


def test_completion_mask_equals_transformers_assistant_mask(folder, hf_tokenizer):
    """The unmarked template (trained spans from prefix renders) and the marked one (its own generation spans)
    both give transformers' assistant mask of the marked template, token for token."""
    for record in CHAT_RECORDS:
        out = hf_tokenizer.apply_chat_template(record["messages"], chat_template=CHATML_MARKED, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        for template in (CHATML, CHATML_MARKED):
            example = tokenize(record, tokens(folder, template), "record")
            assert example.ids.tolist() == list(out["input_ids"])
            assert example.trained.astype(int).tolist() == list(out["assistant_masks"])
    assert 0 < np.mean(out["assistant_masks"]) < 1


def test_named_templates_and_the_template_file(folder, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]}))
    assert load_chat_template(tmp_path) == "A"
    (tmp_path / "chat_template.jinja").write_text("C")  # transformers: the file wins
    assert load_chat_template(tmp_path) == "C"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x", "template": "B"}]}))
    with pytest.raises(ValueError, match="none named 'default'"):
        load_chat_template(tmp_path)
    assert load_chat_template(tmp_path / "nothing-here") is None
    assert special_tokens(folder) == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}


def test_instruction_and_text_records(folder):
    tok = tokens(folder)
    plain = tokenize({"prompt": "Packing puts", "completion": " several examples in one row."}, tok, "r")
    enc = tok.tokenizer.encode("Packing puts several examples in one row.")
    assert plain.ids.tolist() == enc.ids + [1]  # the tokenizer's BOS first, the folder's EOS appended
    prompt_tokens = len(tok.tokenizer.encode("Packing puts").ids)
    assert not plain.trained[:prompt_tokens].any() and plain.trained[prompt_tokens:].all()
    text = tokenize({"text": "Masks and positions."}, tok, "r")
    assert text.trained.all() and text.ids[-1] == 1
    conv = tokenize(CHATS[3], tok, "r")  # conversational prompt + completion: the completion messages only
    full = tokenize({"messages": CHATS[3]["prompt"] + CHATS[3]["completion"]}, tok, "r")
    np.testing.assert_array_equal(conv.ids, full.ids)
    np.testing.assert_array_equal(conv.trained, full.trained)


def test_packed_rows_keep_each_example_to_itself():
    """The loss of every example is the same alone in a padded row and packed with others (RoPE and learned
    positions): the per-segment mask and the restarting positions, through the model."""
    from flax import nnx

    import flax_impl as fi
    from flax_impl.apps.finetune_data import Example
    from flax_impl.apps.finetune_step import loss_sums

    rng = np.random.default_rng(0)
    lengths = [9, 5, 12, 3, 7, 6]
    examples = [Example(rng.integers(0, 50, n).astype(np.int32), rng.random(n) < 0.7, f"e{i}")
                for i, n in enumerate(lengths)]
    packed, padded = pack_rows(examples, 16), pad_rows(examples, 16)
    assert len(packed) == 3 and len(padded) == 6
    seg = packed.arrays["segment_ids"]
    for row in range(len(packed)):  # positions restart at 0 in each segment, in slot order
        for s in set(seg[row].tolist()) - {0}:
            mine = seg[row] == s
            np.testing.assert_array_equal(packed.arrays["positions"][row][mine], np.arange(mine.sum()))
    assert packed.trained_tokens == padded.trained_tokens == sum(e.trained[1:].sum() for e in examples)
    for position in ("rope", "learned"):
        cfg = fi.TransformerConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout=0.0,
                                   causal=True, position=position, max_len=32)
        model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
        model.eval()
        a, na = loss_sums(model, packed.arrays)
        b, nb = loss_sums(model, padded.arrays)
        assert float(na) == float(nb)
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
        broken = dict(packed.arrays, segment_ids=(packed.arrays["segment_ids"] > 0).astype(np.int32))
        assert abs(float(loss_sums(model, broken)[0]) - float(b)) > 1e-3 * float(b)  # the mask matters


def test_step_batches_depend_on_seed_and_step_only():
    from flax_impl.apps.finetune_data import Example

    examples = [Example(np.arange(n, dtype=np.int32), np.ones(n, bool), f"e{n}") for n in range(2, 9)]
    rows = pad_rows(examples, 8)
    one = step_batch(rows, 3, batch_size=2, accumulate=2, seed=5)
    assert one["inputs"].shape == (2, 2, 8)
    np.testing.assert_array_equal(one["inputs"], step_batch(rows, 3, batch_size=2, accumulate=2, seed=5)["inputs"])
    epoch = np.concatenate([step_batch(rows, s, batch_size=1, accumulate=1, seed=5)["inputs"][0] for s in range(7)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, rows.arrays["inputs"].tolist()))  # each once
    held = eval_batches(rows, 3)
    assert [b["inputs"].shape for b in held] == [(1, 3, 8)] * 3
    assert sum(b["weights"].sum() for b in held) == rows.trained_tokens
    train, heldout = split_heldout(examples, 0.3, seed=1)
    assert len(heldout) == 2 and len(train) == 5 and not {e.where for e in train} & {e.where for e in heldout}
    assert (rows.arrays["targets"][rows.arrays["weights"] == 0] == IGNORE_INDEX).all()


BAD = [
    ("empty.jsonl", "\n\n", "holds no record"),
    ("notjson.jsonl", '{"text": "a"}\n{oops\n', "notjson.jsonl:2: not JSON"),
    ("list.jsonl", '["text"]\n', "must be a JSON object"),
    ("fields.jsonl", '{"question": "a", "answer": "b"}\n', "needs 'messages', 'prompt' and 'completion', or 'text'"),
    ("role.jsonl", '{"messages": [{"content": "hi"}]}\n', r"messages\[0\] must be an object with 'role'"),
    ("noassistant.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant"),
    ("mixed.jsonl", '{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}\n',
     "both be strings or both lists"),
    ("long.jsonl", json.dumps({"text": "position " * 50}) + "\n", "longer than a row of --seq-len 64"),
    ("unknown.jsonl", '{"text": "no token for \u00e9"}\n', "no token for 'é'"),
    ("empty.txt", "  \n", "is empty"),
    ("data.csv", "a,b\n", "expected a .txt or .jsonl file"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_refused_naming_file_and_line(folder, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    tok = tokens(folder)
    if name == "unknown.jsonl":  # a tokenizer with an unknown token and no byte fallback
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        t = Tokenizer(models.BPE(unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.train_from_iterator(["no token for e"], trainers.BpeTrainer(special_tokens=["[UNK]"], show_progress=False))
        tok = Tokens(t, None, None, 300)
    with pytest.raises(ValueError, match=message):
        read_examples(path, tok, seq_len=64, max_len=256)


def test_chat_without_template_and_foreign_tokenizer(folder, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS)
    with pytest.raises(ValueError, match=r"chat.jsonl:1: a chat record needs a chat template"):
        read_examples(path, tokens(folder, None), seq_len=200, max_len=256)
    small = Tokens(train_tokenizer(bos=True), 1, None, 100)  # a model of 100 ids, a tokenizer of ~300
    with pytest.raises(ValueError, match="outside the model's vocabulary of 100"):
        read_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "RoPE rotates the queries"}]), small,
                      seq_len=64, max_len=256)
    with pytest.raises(ValueError, match="longer than the model's maximum"):
        read_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "position " * 200}]), tokens(folder),
                      seq_len=64, max_len=64)
