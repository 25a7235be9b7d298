"""How parity_tests build each family's tiny transformers model (SPECS: one per model_type, run through the Flax
model; VARIANTS: the other layouts and block forms of a family, run through the torch twin). Nothing is
downloaded."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Spec:
    """How the test builds one family with transformers: config class + kwargs, model class (+ its kwargs),
    whether it has an LM head, whether ids come with token types, and the id at padded positions."""

    config_cls: str
    kwargs: dict
    model_cls: str
    lm: bool = True
    token_types: bool = False
    pad_id: int = 0
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    # transformers' parameter name -> the checkpoint key transformers 5 saves it under (GPT-NeoX's head).
    saved_names: dict = dataclasses.field(default_factory=dict)


TINY = dict(vocab_size=100, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(
    TINY,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
# Each family's tiny model also exercises what is special about it: GPT-2's Conv1D layout; BERT's post-LN, token
# types and padding_idx; Llama's biases (attention_bias, mlp_bias), linear RoPE scaling and a non-default theta;
# Mistral's sliding window (5 < L); Qwen2's q/k/v-only biases and tied head; BLOOM's per-head qkv with 6 heads
# (not a power of two: Press et al.'s slope order); MPT's 6 heads (its own slope code) and untied head.
ROBERTA_LIKE = dict(
    TINY,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=1,  # as released RoBERTa / XLM-R checkpoints
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=1,
)
SPECS = {
    "gpt2": Spec(
        "GPT2Config",
        dict(TINY, n_embd=32, n_head=4, n_layer=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "GPT2LMHeadModel",
    ),
    "bert": Spec(
        "BertConfig",
        dict(
            TINY,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        ),
        "BertModel",
        lm=False,
        token_types=True,
        model_kwargs=dict(add_pooling_layer=False),
    ),
    "llama": Spec(
        "LlamaConfig",
        dict(
            LLAMA_LIKE,
            attention_bias=True,
            mlp_bias=True,
            pad_token_id=0,
            # Llama 3.1's RoPE: low frequencies (wavelength > 64) / 8, high ones kept, a ramp between.
            rope_parameters=dict(rope_type="llama3", factor=8.0, rope_theta=500_000.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=64),
        ),
        "LlamaForCausalLM",
    ),
    "mistral": Spec("MistralConfig", dict(LLAMA_LIKE, sliding_window=5), "MistralForCausalLM"),
    # Qwen2's mixed windows: layer 0 full, layer 1 sliding (max_window_layers 1), the window 5 shorter than L.
    "qwen2": Spec("Qwen2Config", dict(LLAMA_LIKE, tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                      max_window_layers=1), "Qwen2ForCausalLM"),
    "bloom": Spec("BloomConfig", dict(TINY, hidden_size=48, n_head=6, n_layer=2), "BloomForCausalLM"),
    "mpt": Spec(
        "MptConfig",
        dict(
            TINY,
            d_model=48,
            n_heads=6,
            n_layers=2,
            max_seq_len=64,
            tie_word_embeddings=False,
        ),
        "MptForCausalLM",
    ),
    # The families of issue 24, each with what released checkpoints switch on: partial rotary (GPT-NeoX 1/4 of a
    # 16-wide head, GPT-J / CodeGen rotary_dim 4 of 8, Phi 0.4 of 12 = 4.8 truncated to 4, StableLM 1/4,
    # Phi-4-mini's 3/4), multi-query and grouped kv heads (Falcon, Gemma, GPT-BigCode), biases on (Falcon's
    # grouped qkv bias, StableLM-2's qkv bias), untied heads with and without a bias, sliding windows shorter
    # than the prompt (Phi-3, StarCoder2), OPT's and RoBERTa's positions, DistilBERT's sinusoidal init.
    "gpt_neox": Spec(
        "GPTNeoXConfig",
        dict(TINY, hidden_size=48, num_attention_heads=3, intermediate_size=96, num_hidden_layers=2,
             max_position_embeddings=64, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                              partial_rotary_factor=0.25)),
        "GPTNeoXForCausalLM",
        saved_names={"lm_head.weight": "embed_out.weight"},
    ),
    "gptj": Spec("GPTJConfig", dict(TINY, n_embd=32, n_head=4, n_layer=2, rotary_dim=4, n_positions=64),
                 "GPTJForCausalLM"),
    "codegen": Spec("CodeGenConfig", dict(TINY, n_embd=32, n_head=4, n_layer=2, rotary_dim=4, n_positions=64),
                    "CodeGenForCausalLM"),
    "falcon": Spec(
        "FalconConfig",
        dict(TINY, hidden_size=32, num_attention_heads=4, num_kv_heads=2, num_hidden_layers=2,
             new_decoder_architecture=True, bias=True, max_position_embeddings=64),
        "FalconForCausalLM",
    ),
    "phi": Spec(
        "PhiConfig",
        dict(TINY, hidden_size=48, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
             max_position_embeddings=64, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                              partial_rotary_factor=0.4)),
        "PhiForCausalLM",
    ),
    "phi3": Spec(
        "Phi3Config",
        # Phi-3 long-context RoPE: L = 12 > original_max_position_embeddings 8 takes the long factors, and the
        # attention factor sqrt(1 + ln(64 / 8) / ln 8); 3/4 of each head rotates (Phi-4-mini).
        dict(LLAMA_LIKE, pad_token_id=0, sliding_window=5, original_max_position_embeddings=8,
             rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                  short_factor=[1.0, 1.5, 2.0], long_factor=[1.5, 3.0, 6.0])),
        "Phi3ForCausalLM",
    ),
    "stablelm": Spec(
        "StableLmConfig",
        dict(TINY, hidden_size=48, num_attention_heads=3, num_key_value_heads=3, intermediate_size=64,
             num_hidden_layers=2, max_position_embeddings=64, use_qkv_bias=True, pad_token_id=0,
             rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
        "StableLmForCausalLM",
    ),
    "opt": Spec(
        "OPTConfig",
        dict(TINY, hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2,
             max_position_embeddings=64, dropout=0.0),
        "OPTForCausalLM",
        pad_id=1,
    ),
    "gpt_bigcode": Spec(
        "GPTBigCodeConfig",
        dict(TINY, n_embd=32, n_head=4, n_layer=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "GPTBigCodeForCausalLM",
    ),
    "roberta": Spec("RobertaConfig", dict(ROBERTA_LIKE), "RobertaModel", lm=False, pad_id=1,
                    model_kwargs=dict(add_pooling_layer=False)),
    "xlm-roberta": Spec("XLMRobertaConfig", dict(ROBERTA_LIKE), "XLMRobertaModel", lm=False, pad_id=1,
                        model_kwargs=dict(add_pooling_layer=False)),
    "distilbert": Spec(
        "DistilBertConfig",
        dict(TINY, dim=32, n_heads=4, hidden_dim=64, n_layers=2, max_position_embeddings=64, dropout=0.0,
             attention_dropout=0.0, sinusoidal_pos_embds=True),
        "DistilBertModel",
        lm=False,
    ),
    "gemma": Spec(
        "GemmaConfig",
        dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=16, pad_token_id=0, rms_norm_eps=1e-6),  # 16 != 32 / 4
        "GemmaForCausalLM",
    ),
    # The attention features as released checkpoints use them: a head width other than D / N, QK-norm, Qwen's
    # [full, sliding] layers (Qwen3), query_pre_attn_scalar 24 != head_dim 16 and both soft-caps (small enough to
    # bend the tiny model's scores and logits: Gemma 2), Gemma 3's (1 + w) QK-norm, local RoPE base 1e4 on its
    # sliding layers and linear scaling 8 on the full ones; every window (5) shorter than the prompt.
    # Granite's four scalars, each away from 1 (released: embedding 12, residual 0.22, attention 1 / 128, logits 8).
    "granite": Spec(
        "GraniteConfig",
        dict(LLAMA_LIKE, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
             logits_scaling=4.0, pad_token_id=0),
        "GraniteForCausalLM",
    ),
    "qwen3": Spec(
        "Qwen3Config",
        dict(LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1,
             attention_bias=True, pad_token_id=0),
        "Qwen3ForCausalLM",
    ),
    "gemma2": Spec(
        "Gemma2Config",
        dict(LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
             final_logit_softcapping=3.0, sliding_window=5, pad_token_id=0, bos_token_id=2, eos_token_id=1),
        "Gemma2ForCausalLM",
    ),
    "gemma3_text": Spec(
        "Gemma3TextConfig",
        dict(LLAMA_LIKE, head_dim=16, num_key_value_heads=1, query_pre_attn_scalar=24, sliding_window=5,
             layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1,
             rope_parameters=dict(full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
                                  sliding_attention=dict(rope_type="default", rope_theta=10_000.0))),
        "Gemma3ForCausalLM",
    ),
    "starcoder2": Spec(
        "Starcoder2Config",
        dict(TINY, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             num_hidden_layers=2, max_position_embeddings=64, sliding_window=6),
        "Starcoder2ForCausalLM",
    ),
}  # fmt: skip
FAMILIES = sorted(SPECS)

# The other layouts and block forms of a family, each proven through the torch twin (no compile): Falcon's
# classic multi-query (Falcon-7B) and multi-head layouts, its sequential block and its new architecture with one
# norm; GPT-NeoX and StableLM in the other residual form; OPT post-LN (opt-350m's blocks) and without its final
# norm; GPT-BigCode multi-head.
VARIANTS = {
    "falcon-7b": ("falcon", dataclasses.replace(SPECS["falcon"], kwargs=dict(
        SPECS["falcon"].kwargs, new_decoder_architecture=False, num_kv_heads=None, bias=False))),
    "falcon-mha-sequential": ("falcon", dataclasses.replace(SPECS["falcon"], kwargs=dict(
        SPECS["falcon"].kwargs, new_decoder_architecture=False, multi_query=False, parallel_attn=False,
        num_kv_heads=None))),
    "falcon-new-one-norm": ("falcon", dataclasses.replace(SPECS["falcon"], kwargs=dict(
        SPECS["falcon"].kwargs, num_ln_in_parallel_attn=1))),
    "gpt_neox-sequential": ("gpt_neox", dataclasses.replace(SPECS["gpt_neox"], kwargs=dict(
        SPECS["gpt_neox"].kwargs, use_parallel_residual=False, tie_word_embeddings=True))),
    "stablelm-parallel": ("stablelm", dataclasses.replace(SPECS["stablelm"], kwargs=dict(
        SPECS["stablelm"].kwargs, use_parallel_residual=True))),
    "opt-post-ln": ("opt", dataclasses.replace(SPECS["opt"], kwargs=dict(
        SPECS["opt"].kwargs, do_layer_norm_before=False, enable_bias=False))),
    "opt-no-final-norm": ("opt", dataclasses.replace(SPECS["opt"], kwargs=dict(
        SPECS["opt"].kwargs, _remove_final_layer_norm=True, tie_word_embeddings=False))),
    "gpt_bigcode-mha": ("gpt_bigcode", dataclasses.replace(SPECS["gpt_bigcode"], kwargs=dict(
        SPECS["gpt_bigcode"].kwargs, multi_query=False))),
    "llama-linear": ("llama", dataclasses.replace(SPECS["llama"], kwargs=dict(
        SPECS["llama"].kwargs, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0)))),
    "llama-yarn": ("llama", dataclasses.replace(SPECS["llama"], kwargs=dict(
        SPECS["llama"].kwargs, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10_000.0,
                                                    original_max_position_embeddings=16)))),
    # dynamic NTK RoPE past its length (max_position_embeddings 8 < L = 12): the base grows with the length.
    "llama-dynamic": ("llama", dataclasses.replace(SPECS["llama"], kwargs=dict(
        SPECS["llama"].kwargs, max_position_embeddings=8,
        rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10_000.0)))),
    "phi-qk-layernorm": ("phi", dataclasses.replace(SPECS["phi"], kwargs=dict(SPECS["phi"].kwargs, qk_layernorm=True))),

}  # fmt: skip
