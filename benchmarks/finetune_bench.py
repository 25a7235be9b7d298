"""Fine-tuning throughput and memory: Flax (`flax-impl finetune`'s step) against transformers + torch, full and LoRA,
on the same batches, side by side in one process.

    python benchmarks/finetune_bench.py --size real --json benchmarks/finetune-cpu-DATE.json

`--size real` is the size of a small real checkpoint: a Llama-architecture model of 30 layers x 576, 9 heads / 3 kv
heads, d_ff 1536, vocabulary 49,152, tied embeddings (135 M parameters), random weights, saved once as a Hugging
Face folder that both sides load; `--size tiny` (2 x 64) checks the script. Each step: one (B, L) batch whose
second half of every row is the completion (the loss counts it only), float32, the loss and gradients, global-norm
clipping to 1.0, one AdamW update (over every weight, or over the LoRA adapters only: rank --lora-r on
--lora-targets on both sides, peft on the torch side). Flax runs `flax_impl.apps.finetune_step.train_step`
(jitted, scanned layers); torch runs eager transformers with its default attention (SDPA). The sides are timed in
rounds of one step each (`flax_impl.apps.bench.common.time_calls`: first call = compile, then rounds in
alternating order); tokens/s = B x L / step time; Flax / torch = the per-round ratio of times (> 1: Flax is
faster), median and range. Memory: each side alone in a process of its own, two steps: on a GPU the framework's
own peak allocation; on a CPU the process's resident-set high-water mark (and its resident size before the model
loaded, the frameworks' own baseline). The first call's losses of the two sides of a pair are printed: the same
weights and batch give the same loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

SIZES = {
    "real": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
SIDES = ("full", "lora")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def make_folder(path: Path, size: str) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def make_batch(vocab: int, B: int, L: int) -> dict[str, np.ndarray]:
    """(1, B, L) micro-batch: random ids, the second half of each row trained."""
    ids = np.random.default_rng(0).integers(3, vocab, size=(B, L + 1)).astype(np.int32)
    weights = (np.arange(L) >= L // 2).astype(np.float32)[None].repeat(B, 0)
    return {"inputs": ids[None, :, :-1], "targets": ids[None, :, 1:], "weights": weights[None],
            "attention_mask": np.ones((1, B, L), np.int32)}


def flax_side(folder: Path, batch: dict, lora: dict | None):
    """A call that runs one Flax step and returns its loss."""
    import jax.numpy as jnp
    from flax import nnx

    import flax_impl.hf
    from flax_impl.apps import finetune_step as fs
    from flax_impl.config import TrainConfig
    from flax_impl.lora import LoraConfig, apply_lora, make_lora_optimizer
    from flax_impl.train import make_optimizer

    batch = {k: jnp.asarray(v) for k, v in batch.items()}  # on the device once, as the torch side's tensors
    _, model = flax_impl.hf.from_pretrained(folder)
    model.train()
    tcfg = TrainConfig(learning_rate=1e-5, warmup_steps=0, total_steps=10_000, weight_decay=0.0, clip_norm=1.0)
    if lora is None:
        optimizer = make_optimizer(model, tcfg)
    else:
        apply_lora(model, LoraConfig(model_type="llama", **lora), rngs=nnx.Rngs(0))
        optimizer = make_lora_optimizer(model, tcfg)
    return lambda: float(fs.train_step(model, optimizer, batch)["loss"])


def torch_side(folder: Path, batch: dict, lora: dict | None, device: str):
    """A call that runs one transformers + torch.optim step and returns its loss."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(device).train()
    if lora is not None:
        import peft

        config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                 target_modules=list(lora["targets"]))
        model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    ids, targets, w, mask = (torch.as_tensor(batch[k][0]).to(device).long() if k != "weights" else
                             torch.as_tensor(batch[k][0]).to(device) for k in ("inputs", "targets", "weights",
                                                                                "attention_mask"))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (ce * w.flatten()).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = loss.item()  # waits for the device
        return value

    return step


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def memory_of(name: str, folder: Path, batch: dict, lora: dict | None, torch_device: str) -> dict:
    """Run two steps of one side alone (this process) and return its peak memory in MB: on a GPU the framework's
    own peak allocation; on a CPU the resident-set high-water mark and the resident size before the model loaded."""
    import jax

    base = _rss_mb("VmRSS")
    fn = flax_side(folder, batch, lora) if name.startswith("flax") else torch_side(folder, batch, lora, torch_device)
    fn(), fn()
    if torch_device.startswith("cuda") and name.startswith("torch"):
        import torch

        return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    if stats and name.startswith("flax"):
        return {"gpu_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20}
    return {"rss_peak_mb": _rss_mb("VmHWM"), "rss_before_mb": base}


def _memory_text(m: dict) -> str:
    if "gpu_peak_mb" in m:
        return f"peak {m['gpu_peak_mb']:,.0f} MB on the GPU"
    return f"peak RSS {m['rss_peak_mb']:,.0f} MB ({m['rss_peak_mb'] - m['rss_before_mb']:,.0f} above the start)"


def measure_memory(args: argparse.Namespace, folder: Path, name: str) -> dict:
    """`memory_of` in a fresh process (each framework's peak alone)."""
    import subprocess

    argv = [sys.executable, __file__, "--size", args.size, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--lora-targets", args.lora_targets,
            "--memory-of", name, "--folder", str(folder)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    from flax_impl.apps.bench.common import pair_ratios, time_calls
    from flax_impl.apps.bench.machine import describe, detect_machine, load_average
    from flax_impl.apps.progress import Progress

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="real")
    p.add_argument("--batch", type=int, default=4, help="rows per step [4]")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row [256]")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds [5]")
    p.add_argument("--sides", default="full,lora", help="full, lora or both [full,lora]")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=TARGETS)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs (one process per side)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one side's memory, in a process of its own
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if not sides or set(sides) - set(SIDES) or min(args.batch, args.seq_len, args.rounds, args.lora_r) < 1:
        p.error(f"--sides from {SIDES}; --batch, --seq-len, --rounds, --lora-r >= 1")
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch_device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    machine = detect_machine(with_torch=True, packages=("transformers", "peft"))
    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "targets": tuple(args.lora_targets.split(","))}
    if args.memory_of:
        side = None if args.memory_of.endswith("full") else lora
        batch = make_batch(SIZES[args.size]["vocab_size"], args.batch, args.seq_len)
        print(json.dumps(memory_of(args.memory_of, Path(args.folder), batch, side, torch_device)))
        return {}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "llama", args.size)
        batch = make_batch(SIZES[args.size]["vocab_size"], args.batch, args.seq_len)
        for side in sides:
            cfg = None if side == "full" else lora
            runners = {f"flax-{side}": flax_side(folder, batch, cfg),
                       f"torch-{side}": torch_side(folder, batch, cfg, torch_device)}
            progress = Progress(2 * (args.rounds + 1))
            timed = time_calls(runners, args.rounds, progress, side)
            progress.close()
            tokens = args.batch * args.seq_len
            flax_t, torch_t = timed[f"flax-{side}"], timed[f"torch-{side}"]
            results[side] = {
                "first_loss": {n: t["output"] for n, t in timed.items()},
                "compile_s": {n: t["first"] for n, t in timed.items()},
                "tokens_per_s": {n: [tokens / s for s in t["times"]] for n, t in timed.items()},
                "flax_over_torch": pair_ratios(flax_t["times"], torch_t["times"]),
                "rss_step_mb": {n: t["rss_step_mb"] for n, t in timed.items()},
            }
            del runners, timed, flax_t, torch_t
            if not args.no_memory:
                results[side]["memory"] = {n: measure_memory(args, folder, n) for n in (f"flax-{side}",
                                                                                        f"torch-{side}")}
    machine["load_average_end"] = load_average()
    report = {"command": "python benchmarks/finetune_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "started": started, "machine": machine, "size": args.size, "model": SIZES[args.size],
              "batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds, "lora": lora, "results": results}
    print(f"machine: {describe(machine)}")
    for side, r in results.items():
        tps = {n: float(np.median(v)) for n, v in r["tokens_per_s"].items()}
        ratio = r["flax_over_torch"]
        print(f"{side:>4}: " + ", ".join(f"{n} {v:,.0f} tokens/s" for n, v in tps.items())
              + f"; Flax / torch {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}); first losses "
              + ", ".join(f"{v:.6f}" for v in r["first_loss"].values())
              + "".join(f"; {n} {_memory_text(m)}" for n, m in r.get("memory", {}).items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
