"""Fixtures for both test folders: matmul precision pinned to "highest" (before any test module imports jax
code), seeds, and torch on this machine's two cores. Helpers live in parity_tests/helpers.py."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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
