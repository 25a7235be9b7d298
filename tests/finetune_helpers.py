"""Tiny Hugging Face folders for the finetune tests, made offline: a byte-level BPE trained in-process, a ChatML
chat template in tokenizer_config.json, a transformers model from a config with every parameter perturbed, saved
with save_pretrained. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "Position is information, and the architecture chooses where it enters.",
    "RoPE rotates the queries and keys inside attention; ALiBi adds a bias to the scores.",
    "Learned positions have a hard maximum length: sixty-four tokens in this tiny model.",
    "The assistant answers briefly. The user asks about masks, packing and positions.",
    "Fine-tuning moves every weight a little; LoRA moves a low-rank update instead.",
]
BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATS = [
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What does RoPE rotate?"},
                  {"role": "assistant", "content": "The queries and keys."},
                  {"role": "user", "content": "And ALiBi?"},
                  {"role": "assistant", "content": "It adds a bias to the scores."}]},
    {"messages": [{"role": "user", "content": "Name a position scheme."},
                  {"role": "assistant", "content": "Learned positions."}]},
    {"prompt": "Packing puts", "completion": " several examples in one row."},
    {"prompt": [{"role": "user", "content": "What moves in LoRA?"}],
     "completion": [{"role": "assistant", "content": "A low-rank update."}]},
    {"text": "The architecture chooses where position enters."},
]


def train_tokenizer(bos: bool):
    """A byte-level BPE (vocabulary ~300) with <s>, </s>, <|im_start|>, <|im_end|> as special tokens; `bos`: its
    post-processor prepends <s> (as Llama's), else nothing (as GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS, IM_START, IM_END], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def hf_config(family: str, vocab: int, **kw):
    """A tiny transformers config of `family` ("llama" or "gpt2"), dropout off, max length 256."""
    import transformers

    ids = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "llama":
        return transformers.LlamaConfig(**ids, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        rms_norm_eps=1e-5, tie_word_embeddings=False, **kw)
    if family == "gpt2":
        return transformers.GPT2Config(**ids, n_embd=32, n_head=4, n_layer=2, n_positions=256, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    raise ValueError(family)


def make_folder(path: Path, family: str, *, seed: int = 0, template: str | None = CHATML) -> Path:
    """Save a tiny `family` model (every parameter perturbed by N(0, 0.2^2)) with its tokenizer and template."""
    import torch
    import transformers

    tok = train_tokenizer(bos=family == "llama")
    cfg = hf_config(family, tok.get_vocab_size())
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
          "model_max_length": 256}
    if template is not None:
        tc["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
