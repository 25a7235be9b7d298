"""Every tolerance of the parity suite and of `flax-impl parity`, in one place, each with its reason.

All comparisons are element-wise (np.testing.assert_allclose with rtol=0 unless stated) in float32, matmul
precision pinned to "highest" in conftest.py.
"""

# Values that are copied, transposed or stacked, never computed: conversion round trips, eval-mode dropout,
# Embed lookups of the same table. Any difference is a bug.
EXACT = 0.0

# Pure elementwise float32 math done by the same formula on both sides (RoPE rotations, ALiBi biases,
# sinusoidal tables built in float64 and rounded once): sin/cos of XLA and ATen differ by at most an ulp or two
# of values bounded by |x|, so 1e-6 absolute on unit-scale inputs, at any length up to 4096 (issue 3).
ELEMENTWISE = 1e-6

# One short float32 sum of unit-scale products (D <= 64 terms: tied-embedding logits x . E^T, an embedding row's
# gradient summed over the positions that use it): XLA, ATen and numpy add in different orders, a few float32 ulps
# of the sum (~1e-7 each at unit scale), so 1e-6 absolute.
SHORT_SUM = 1e-6

# One Transformer block, unit-scale inputs: XLA and ATen order the D- and F-long matmul reductions
# differently, ~1e-7 relative per sum; LayerNorm, softmax and erf add a few ulps. Issue 4 budget: 1e-5.
BLOCK = 1e-5

# A stack of 6 blocks (and any smaller stack): the per-block differences above add up layer by layer through
# the residual stream; measured ~2e-6 for 6 layers, budget 5e-5 (issue 4).
ENCODER = 5e-5

# The same Flax stack run through two XLA programs: layers scanned over a stacked axis vs a Python loop, or
# op-by-op eager vs one jitted program. XLA fuses, and so orders the D- and F-long reductions, differently in each,
# so outputs differ by a few ulps of their scale (ulp(4) = 4.8e-7) even for identical weights. Measured
# (3 RoPE layers, D=32, outputs up to ~3.3, 4 seeds): the unrolled stack eager vs the same stack jitted
# 7.6e-7..9.5e-7, scanned vs unrolled eager 7.7e-7..9.5e-7, both jitted <= 4.8e-7. Budget ~10 ulps of 4;
# a layer applied twice, skipped or taken in the wrong order moves outputs by O(1).
RECOMPILED = 5e-6

# Gradients of a scalar loss w.r.t. parameters: the backward pass sums over B*L positions, so absolute error
# grows with the gradient's scale; compared relative to the largest entry of each gradient tensor.
GRAD_REL = 1e-5

# Training: loss per step and the parameters after 10 AdamW steps, relative (issue 5).
TRAIN_REL = 1e-5

# Dropout's law: the dropped fraction over n Bernoulli(p) draws lies within this many binomial standard
# deviations of p (issue 2); 5 sigma fails a correct implementation with probability ~6e-7.
DROPOUT_SIGMAS = 5.0

# Decoding with a KV cache (parity_tests/test_generation.py): a whole causal model's logits (2 blocks, every
# parameter perturbed, logits up to ~27), through the cache against the full forward of the unpadded prefix (the
# same framework with another attention kernel and summation order), and the twins' decoding loops against each
# other. Float32 roundoff scales with the logits, so compared relative to the largest |logit| of the row (BLOCK's
# 1e-5, relative). Measured max 1.9e-6 (cached vs full) and 1.4e-6 (twins) over the five cached configs x 2
# seeds; a position off by one, a dropped window key or a wrong ALiBi distance moves logits by O(1) relative.
DECODE_REL = 1e-5

# Sampling's law (parity_tests/test_generation.py): each token's frequency over n draws lies within this many
# binomial standard deviations of its probability under the filtered softmax; 5 sigma per token fails a correct
# sampler with probability ~6e-7 each.
SAMPLING_SIGMAS = 5.0

# Quantities computed in float64 and rounded once to float32, float32 rotations compared by their norms
# (ALiBi slope ratios, |rope(x)| vs |x|), or a float32 pipeline output (embedding x sqrt(D) + position, values
# up to ~20) against its float64 formula: a few float32 ulps (1.2e-7 relative each), compared relative.
FLOAT32_REL = 1e-6

# The input LayerNorm (TransformerInput / encode_text with input_norm, issue 3): x_hat = (x - mu) / sigma is up
# to ~4 in size and XLA and ATen reduce mu and sigma^2 over D in different orders (~1e-7 relative), so x_hat
# differs by a few ulps of 4 (4.8e-7 each), then times a random unit-scale gamma (|gamma| <= ~3). Measured max
# 1.9e-6 over 180 random twin pairs (D = 32); budget 5e-6, still below one block's BLOCK.
LAYER_NORM = 5e-6

# RoPE's relative-position property <rope(q, i), rope(k, j)> = f(i - j), tested at positions < 128 (issue 3):
# the float32 angle p * theta is rounded to at most ulp(128)/2 = 3.8e-6 rad, so one (i, j) pair's relative
# angle is off by <= 7.6e-6 and two pairs on the same diagonal by <= 1.5e-5; the dot product then moves by at
# most that times |q||k|. Compared relative to |q||k|.
ROPE_RELATIVE = 2e-5

# bfloat16 compute (dtype="bfloat16", param_dtype="float32") against torch_ref under torch.autocast("cpu",
# torch.bfloat16), and against torch_ref in float32 (issue 7). bf16 keeps 8 significant bits: one rounding moves
# a value by at most u = 2^-8 = 3.9e-3 of itself. Both sides round every matmul's inputs and outputs to bf16
# (Flax also its residual stream and output; autocast keeps those float32), then LayerNorm re-normalises each
# block, so per-block errors add rather than multiply: a few u of the output scale. Measured over 48 encoders
# (4 position schemes x pre/post-LN x 1, 2, 4 layers x 2 seeds; D=32, L=16, padded): max |flax_bf16 - torch_autocast|
# / max|y| = 3.2u (mean 2.0u); flax bf16 vs torch float32 2.9u; torch autocast vs torch float32 3.4u; the float32
# path 1.4e-4 u (5.5e-7). Budget 6u ~ 0.023, element-wise, relative to the reference's largest |y|, encoders up
# to 4 layers. It catches RoPE angles computed in bf16 (positions >= 1000: 48-98u), but not the tanh GELU in
# place of the erf GELU: max |gelu - gelu_tanh| = 4.7e-4 (at x = 2.7) is below bf16 resolution at unit scale;
# the float32 tolerances (BLOCK, ENCODER) catch that one.
BF16_REL = 6 * 2.0**-8

# A whole transformers model against ours (parity_tests/test_hf.py: 2 layers, D = 32-48, every parameter perturbed
# by N(0, 0.2^2), outputs up to ~4), float32, matmul precision "highest", transformers' eager attention, real
# positions of a right-padded batch: hidden states after the last block (and final norm) and LM-head logits.
# XLA and ATen order the D-, F- and V-long reductions differently (~1e-7 relative per sum, as BLOCK/ENCODER), plus
# the final norm and the head's D-long sums. Measured max 4.4e-6 (hidden) and 4.0e-6 (logits) over the seven
# families x 3 seeds. Budget 1e-4 absolute (issue 15); wrong conventions move outputs by far more: the erf GELU in
# place of GPT-2's tanh form by 7e-4, RMSNorm eps 1e-6 in place of 1e-5 by 7e-4, a dropped sliding window or RoPE
# scale, swapped per-head qkv rows or missing token types by O(1). Also the per-layer budget of
# `flax-impl parity --hf`.
HF_FORWARD = 1e-4
