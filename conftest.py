"""Fixtures for both test folders: matmul precision pinned to "highest" (before any test module imports jax
code), seeds, and torch on this machine's two cores; one JAX compilation cache per run; the quick proof run's
selection (`-m proof`). Helpers live in parity_tests/helpers.py."""

import os
import re
import shutil
import tempfile
from pathlib import Path

# One persistent JAX compilation cache per pytest run, shared by both xdist workers and every subprocess a test
# starts (they inherit the environment): a program compiled once in the run is loaded, not compiled again. The
# folder is new for each run (a run compiles everything it tests at least once) and removed at its end; a cache
# dir already in the environment (a worker's, or one you set) is used as it is. Every program is cached, however
# quick to compile (min compile time 0).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax-impl-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The quick proof run, `python -m pytest -m proof` (README, docs/parity.md#the-quick-proof-run): the twin parity of
# every core module, forward and gradients, in every position scheme, padded and causal; 10 AdamW steps; and the
# model against transformers for three families (learned positions and Conv1D, RoPE with grouped-query attention
# and RMSNorm, post-LN BERT). Entries are test names, `*` matching any part of the parameters' id.
# tests/test_install.py checks that each entry selects a test.
PROOF = {
    "parity_tests/test_dropout.py": ("test_law_fraction_and_scale[*]", "test_eval_is_identity_bit_for_bit"),
    "parity_tests/test_embedding.py": ("test_forward_and_gradient_match_torch[*]",),
    "parity_tests/test_positions.py": (
        "test_sinusoidal_twins_and_formula[*]",
        "test_rope_twins_at_4096[*]",
        "test_rope_dot_product_depends_only_on_relative_position[*]",
        "test_rotate_qk_twins[*]",
    ),
    "parity_tests/test_norm.py": (
        "test_layer_norm_forward_and_gradients_match_torch[*]",
        "test_rms_norm_against_formula_and_twin_with_gradients",
    ),
    "parity_tests/test_attention.py": (
        "test_parity[*-True-*]",
        "test_decoder_attention_forward_and_gradients_match[*]",
    ),
    "parity_tests/test_block.py": (
        "test_forward_and_gradients_match[True-padding-*]",
        "test_forward_and_gradients_match[True-causal-*]",
        "test_forward_and_gradients_match[False-padding-sinusoidal]",
        "test_decoder_blocks_forward_and_gradients_match[*]",
    ),
    "parity_tests/test_transformer.py": (
        "test_six_layer_forward_matches[True-padding-*]",
        "test_six_layer_forward_matches[True-causal-*]",
        "test_six_layer_gradients_match[True-*]",
        "test_family_stacks_logits_hidden_states_and_gradients_match[True-*]",
    ),
    "parity_tests/test_train.py": (
        "test_ten_steps_match_torch[sinusoidal-False]",
        "test_ten_steps_match_torch[rope-True]",
    ),
    "parity_tests/test_hf.py": tuple(
        f"{test}[{family}]"
        for test in ("test_forward_matches_transformers", "test_gradients_match_transformers")
        for family in ("gpt2", "llama", "bert")
    ),
}

_ROOT = Path(__file__).resolve().parent


def proof_entry_matches(entry: str, name: str) -> bool:
    """Whether PROOF entry `entry` ("test_x[True-*]", `*` any text) selects the test item named `name`."""
    return re.fullmatch(".*".join(map(re.escape, entry.split("*"))), name) is not None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            names = PROOF.get(item.path.relative_to(_ROOT).as_posix(), ())
        except ValueError:  # a test outside the repository
            continue
        if any(proof_entry_matches(entry, item.name) for entry in names):
            item.add_marker(pytest.mark.proof)


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """pyproject's addopts run the suite on two workers (`-n 2 --dist loadfile`, pytest-xdist). Without xdist (not
    installed, or `-p no:xdist`) these options are accepted and ignored here, and the suite runs in one process."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist absent", "pyproject's -n / --dist, ignored (pytest-xdist is not active)")
    # pytest keeps lowercase short options for itself and its plugins: `_addoption`, as pytest-xdist registers -n.
    group._addoption("-n", "--numprocesses", dest="ignored_numprocesses", default=None, help="ignored: no pytest-xdist")
    group.addoption("--dist", dest="ignored_dist", default=None, help="ignored: no pytest-xdist")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bpe():
    """A small BPE trained in-process on SENTENCES (no download)."""
    from helpers import SENTENCES
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return tok
