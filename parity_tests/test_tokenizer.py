"""The tokenizers both twins share (one definition, pure Python): ByteTokenizer, an in-process BPE through
`as_tokenizer`, callables, and `batch_encode`'s padding and mask."""

import numpy as np
import pytest
from helpers import SENTENCES
from hypothesis import given, settings, strategies as st

import flax_impl as fi
import torch_ref as tr
from flax_impl.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, TokenizerAdapter


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = fi.ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 4 for b in text.encode("utf-8")]
    assert all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_byte_tokenizer_special_ids_and_errors():
    tok = fi.ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 1, 2, 3, 260)
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3)
    assert tok.encode("A", add_bos=True, add_eos=True) == [1, 65 + 4, 2]
    assert tok.decode([0, 3, 65 + 4, 0, 0]) == "A"  # specials dropped
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte character: replacement, no error
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 69, 4)] == ["<pad>", "<bos>", "<eos>", "<mask>", "A", "<0x00>"]
    with pytest.raises(ValueError, match="token id 260"):
        tok.decode([260])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")
    assert tr.ByteTokenizer is fi.ByteTokenizer  # one definition, shared by the twins


def test_as_tokenizer_kinds(bpe):
    byte = fi.ByteTokenizer()
    assert fi.as_tokenizer(byte) is byte
    hf = fi.as_tokenizer(bpe)
    assert hf.pad_id == bpe.token_to_id("[PAD]") == 0 and hf.vocab_size == bpe.get_vocab_size()
    assert hf.encode("attention") == bpe.encode("attention").ids
    assert hf.id_to_token(hf.encode("attention")[0]) == bpe.encode("attention").tokens[0]
    fn = fi.as_tokenizer(lambda s: np.arange(len(s)), pad_id=7, vocab_size=10)
    assert isinstance(fn, TokenizerAdapter) and fn.encode("abc") == [0, 1, 2] and fn.pad_id == 7
    with pytest.raises(TypeError, match="no decode"):
        fn.decode([0])
    with pytest.raises(TypeError, match="integer ids"):
        fi.as_tokenizer(lambda s: [0.5]).encode("x")
    with pytest.raises(ValueError, match="negative token id -1"):
        fi.as_tokenizer(lambda s: [-1]).encode("x")
    with pytest.raises(TypeError, match="cannot use int as a tokenizer"):
        fi.as_tokenizer(3)
    with pytest.raises(TypeError, match="pass a tokenizer object"):
        fi.as_tokenizer("gpt2")


def test_batch_encode_shapes_padding_and_mask():
    tok = fi.ByteTokenizer()
    texts = ["a", "héllo", ""]
    ids, mask = fi.batch_encode(texts, tok)
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == mask.dtype == np.int32
    assert mask.sum(axis=1).tolist() == [1, 6, 0]
    for row, m, text in zip(ids, mask, texts, strict=True):
        assert row[m == 1].tolist() == tok.encode(text)
        assert np.all(row[m == 0] == tok.pad_id)
        assert np.all(np.diff(m) <= 0)  # right padding: ones then zeros
    ids8, mask8 = fi.batch_encode(texts, tok, max_len=8)
    assert ids8.shape == (3, 8) and np.array_equal(ids8[:, :6], ids) and np.all(ids8[:, 6:] == 0)
    ids3, mask3 = fi.batch_encode(texts, tok, max_len=3)
    assert ids3.shape == (3, 3) and ids3[1].tolist() == tok.encode("héllo")[:3] and mask3[1].tolist() == [1, 1, 1]
    assert fi.batch_encode([], tok)[0].shape == (0, 0)
    assert fi.batch_encode(["", ""], tok)[0].shape == (2, 0)


def test_batch_encode_with_bpe_and_callables(bpe):
    ids, mask = fi.batch_encode(SENTENCES[:3], bpe)
    lengths = [len(bpe.encode(s).ids) for s in SENTENCES[:3]]
    assert ids.shape == (3, max(lengths)) and mask.sum(axis=1).tolist() == lengths
    assert np.all(ids[mask == 0] == bpe.token_to_id("[PAD]"))
    with pytest.raises(ValueError, match="no pad id"):
        fi.batch_encode(["ab", "abc"], lambda s: [ord(c) for c in s])
    ids, mask = fi.batch_encode(["ab", "abc"], fi.as_tokenizer(lambda s: [ord(c) for c in s], pad_id=0))
    assert ids.tolist() == [[97, 98, 0], [97, 98, 99]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert fi.batch_encode(["ab", "cd"], lambda s: [ord(c) for c in s])[0].shape == (2, 2)  # no padding needed


def test_batch_encode_bad_arguments():
    tok = fi.ByteTokenizer()
    with pytest.raises(TypeError, match="list of str, got str"):
        fi.batch_encode("one string", tok)
    with pytest.raises(TypeError, match="found a int"):
        fi.batch_encode(["a", 3], tok)
    with pytest.raises(ValueError, match="max_len=-1"):
        fi.batch_encode(["a"], tok, max_len=-1)
