"""The built-in family tables, one declarative table per Hugging Face model_type, registered in
`flax_impl.hf.registry.FAMILIES` on import. Grouped by what they share:

- `encoders`: bert, roberta, xlm-roberta, distilbert;
- `gpt`: gpt2, gpt_bigcode, opt;
- `alibi`: bloom, mpt;
- `llama`: llama, granite, mistral, qwen2; `llama_like`: gemma, phi3, starcoder2; `gemma_qwen3`: qwen3, gemma2,
  gemma3_text;
- `parallel`: gpt_neox, gptj, codegen, phi, stablelm; `falcon`: falcon.

Read `flax_impl.hf.spec` for the vocabulary. Every default is the transformers config class's own (checked in
parity_tests/test_hf.py against the installed transformers); every refusal says what the option does that
flax_impl does not. Our key names are torch_ref's state-dict names (`flax_impl.interop`).
"""

from __future__ import annotations

from flax_impl.hf.families.alibi import BLOOM, MPT
from flax_impl.hf.families.encoders import BERT, DISTILBERT, ROBERTA, XLM_ROBERTA
from flax_impl.hf.families.falcon import FALCON
from flax_impl.hf.families.gemma_qwen3 import GEMMA2, GEMMA3_TEXT, QWEN3
from flax_impl.hf.families.gpt import GPT2, GPT_BIGCODE, OPT
from flax_impl.hf.families.llama import GRANITE, LLAMA, MISTRAL, QWEN2
from flax_impl.hf.families.llama_like import GEMMA, PHI3, STARCODER2
from flax_impl.hf.families.parallel import CODEGEN, GPT_NEOX, GPTJ, PHI, STABLELM
from flax_impl.hf.registry import FAMILIES, family, register_family

BUILTIN = (
    BERT, BLOOM, CODEGEN, DISTILBERT, FALCON, GEMMA, GEMMA2, GEMMA3_TEXT, GPT2, GRANITE, GPT_BIGCODE, GPT_NEOX,
    GPTJ, LLAMA, MISTRAL, MPT, OPT, PHI, PHI3, QWEN2, QWEN3, ROBERTA, STABLELM, STARCODER2, XLM_ROBERTA,
)  # fmt: skip
for _table in BUILTIN:
    if _table.model_type not in FAMILIES:  # a re-import (importlib.reload) keeps what is registered
        register_family(_table)

__all__ = ["BUILTIN", "FAMILIES", "family", "register_family"]
