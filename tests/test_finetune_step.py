"""The fine-tuning step's execution options (`flax-impl finetune --remat`, `--bf16`) against the plain float32 step
on one batch of a tiny Llama folder (padded, completion-only, 2 micro-batches accumulated): remat recomputes each
block in the backward pass and changes no number beyond float32 roundoff (loss, gradient norm and every updated
weight within TRAIN_REL); bf16 compute with float32 parameters and AdamW state gives the float32 loss within
BF16_REL. The plain step itself is proven against PyTorch in tests/test_finetune_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
from finetune_helpers import CHATS, make_folder
from flax import nnx

from flax_impl.apps import finetune_step as fs
from flax_impl.apps.finetune_batches import pad_rows, step_batch
from flax_impl.apps.finetune_data import Tokens, tokenize
from flax_impl.apps.finetune_template import ChatTemplate, load_chat_template, special_tokens
from flax_impl.config import FlaxConfig, TrainConfig
from flax_impl.tolerances import BF16_REL, TRAIN_REL

TCFG = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1, clip_norm=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, one step's (A, B, L) batch)."""
    from tokenizers import Tokenizer

    folder = make_folder(tmp_path_factory.mktemp("ft-step") / "llama", "llama")
    tok = Tokens(Tokenizer.from_file(str(folder / "tokenizer.json")), 1,
                 ChatTemplate(load_chat_template(folder), special_tokens(folder)), 300)
    rows = pad_rows([tokenize(r, tok, f"record {i}") for i, r in enumerate(CHATS)], 128, pad_id=1)
    return folder, step_batch(rows, 0, batch_size=2, accumulate=2, seed=0)


def one_step(folder, batch, **flax_config) -> tuple[dict, dict, dict]:
    """(metrics, every parameter before and after the update) of one step with these FlaxConfig settings."""
    import flax_impl.hf
    from flax_impl.train import make_optimizer

    _, model = flax_impl.hf.from_pretrained(folder, flax_config=FlaxConfig(**flax_config))
    model.train()

    def params() -> dict:
        return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    before = params()
    metrics = fs.train_step(model, make_optimizer(model, TCFG), batch)
    return {k: float(v) for k, v in metrics.items()}, before, params()


@pytest.fixture(scope="module")
def plain(setup):
    return one_step(*setup)


@pytest.mark.slow  # the plain and the remat step compiled (~25 s of CPU; a minute or two on a busy host)
def test_remat_computes_the_same_step(setup, plain):
    metrics, _, params = one_step(*setup, remat=True)
    want_metrics, _, want = plain
    for key in ("loss", "grad_norm"):
        assert abs(metrics[key] - want_metrics[key]) <= TRAIN_REL * want_metrics[key], key
    assert params.keys() == want.keys()
    for path, value in want.items():
        scale = np.abs(value).max()
        assert np.abs(params[path] - value).max() <= TRAIN_REL * scale, path


@pytest.mark.slow  # one more step program (~10 s of CPU)
def test_bf16_compute_keeps_float32_state_and_the_loss(setup, plain):
    metrics, before, params = one_step(*setup, dtype="bfloat16")
    want_metrics = plain[0]
    assert abs(metrics["loss"] - want_metrics["loss"]) <= BF16_REL * want_metrics["loss"]
    assert metrics["loss"] != want_metrics["loss"]  # the compute was bf16 indeed
    assert all(v.dtype == np.float32 for v in params.values())  # parameters (and so AdamW's moments) in float32
    # AdamW's first step moves every weight by ~lr (m / sqrt(v) = sign(g)), in bf16 compute too
    assert all(np.abs(params[p] - v).max() > 0.5 * TCFG.learning_rate for p, v in before.items())
