"""How far a float8 KV cache moves a model's outputs from those of a cache in the model's dtype.

Both engines run the same prompts. Greedy agreement: the share of generated positions where the
float8 engine's own greedy tokens equal the reference engine's (one early difference changes the rest
of a sequence, so this compounds). Teacher-forced: the float8 engine is fed the reference's greedy
tokens instead of its own, and at every generated position its logits are compared with the
reference's: the largest and the mean absolute difference relative to the range (max - min) of the
reference logits there, and the share of positions whose top token is the reference's.

run() is `bench.py --kv-quality`.
"""
import tempfile
import time
from random import Random

import torch

from benchmarks.common import device_name, on_gpu, preset_model, vocab_size, with_engine
from benchmarks.report import print_table
from benchmarks.workloads import random_prompt
from nanovllm import LLM, SamplingParams
from nanovllm.engine.scheduler import Batch
from nanovllm.engine.step_tokens import StepTokens


def teacher_forced_logits(llm: LLM, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """The logits (float32, CPU) [len(c), vocab] before each token of each continuation c, with the
    engine fed c in place of its samples (an engine with async_scheduling=False: each step's tokens
    must be known before the next step is planned)."""
    if llm.config.scheduler.async_scheduling:
        raise ValueError("teacher forcing needs an engine built with async_scheduling=False")
    runner = llm.model_runner
    forced, logits = {}, {}

    def launch(batch: Batch, *args, **kwargs):
        step = runner.logits(batch).float().cpu()
        tokens = []
        for seq, row in zip(batch.seqs, step):
            position = seq.num_completion_tokens  # meaningful once this step completes the prompt
            logits[seq.seq_id][position] = row
            tokens.append(forced[seq.seq_id][min(position, len(forced[seq.seq_id]) - 1)])
        return StepTokens(torch.tensor(tokens))

    ids = []
    runner.launch = launch
    try:
        for prompt, continuation in zip(prompts, continuations):
            seq_id = llm.add_request(prompt, SamplingParams(max_tokens=len(continuation), ignore_eos=True))
            forced[seq_id], logits[seq_id] = continuation, {}
            ids.append(seq_id)
        while llm.has_unfinished_requests():
            llm.step()
    finally:
        del runner.launch
    return [torch.stack([logits[i][p] for p in range(len(forced[i]))]) for i in ids]


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    return [o["token_ids"] for o in outputs]


def reference_run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """The reference engine's greedy tokens and its logits before each of them (all positions stacked)."""
    tokens = greedy(llm, prompts, max_tokens)
    return tokens, torch.cat(teacher_forced_logits(llm, prompts, tokens))


def measure(ref_tokens: list[list[int]], ref_logits: torch.Tensor, llm: LLM, prompts: list[list[int]]) -> dict:
    """The measures above for an engine against a reference_run on the same prompts."""
    own_tokens = greedy(llm, prompts, max(map(len, ref_tokens)))
    forced_logits = torch.cat(teacher_forced_logits(llm, prompts, ref_tokens))
    span = (ref_logits.amax(-1) - ref_logits.amin(-1)).clamp(min=1e-6)
    error = (forced_logits - ref_logits).abs()
    same = sum(a == b for r, o in zip(ref_tokens, own_tokens) for a, b in zip(r, o))
    return {"positions": ref_logits.size(0),
            "greedy_agreement": same / ref_logits.size(0),
            "forced_top1_agreement": (forced_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "max_abs_error/range": (error.amax(-1) / span).max().item(),
            "mean_abs_error/range": (error.mean(-1) / span).mean().item()}


def compare(reference: LLM, quantized: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    return measure(*reference_run(reference, prompts, max_tokens), quantized, prompts)


def quality_models(preset: str, workdir: str) -> dict[str, str]:
    """name -> checkpoint of a --kv-quality preset; hf-parity: the test suite's tiny transformers checkpoints."""
    if preset != "hf-parity":
        return {preset: preset_model(preset)}
    from tests.helpers import MODEL_VARIANTS, build_checkpoint
    paths = {}
    for variant, spec in MODEL_VARIANTS.items():
        paths[f"hf-parity-{variant}"] = f"{workdir}/{variant}"
        build_checkpoint(paths[f"hf-parity-{variant}"], **spec)
    return paths


def per_layer_scales(llm: LLM) -> None:
    """Each layer's K and V scales set to its largest head's; before any request, so that no cached
    block holds other scales."""
    scales = llm.model_runner.kv_cache.scales
    scales.copy_(scales.amax(-1, keepdim=True).expand_as(scales))


def model_rows(name: str, model: str, prompts: list[list[int]], options: dict, args) -> list[dict]:
    """The float8 cache with per-head and per-layer scales against the model's dtype, on one model; a
    line as each of its three engines finishes."""
    def reference(llm) -> tuple:
        dtype = str(llm.config.dtype).removeprefix("torch.")
        return f"{llm.config.cache.kv_cache_dtype} ({dtype})", *reference_run(llm, prompts, args.quality_tokens)

    print(f"[bench] {name}: {len(prompts)} prompts x {args.quality_tokens} tokens, reference engine", flush=True)
    start = time.perf_counter()
    described, ref_tokens, ref_logits = with_engine(model, options, reference, warm_up=False)
    print(f"[bench] {name}: reference run in {time.perf_counter() - start:.1f} s", flush=True)

    def float8(llm, scales: str) -> dict:
        if scales == "per-layer":
            per_layer_scales(llm)
        return {"model": name, "reference": described, "scales": scales,
                **measure(ref_tokens, ref_logits, llm, prompts)}

    rows = []
    for scales in ("per-head", "per-layer"):
        start = time.perf_counter()
        rows.append(with_engine(model, {**options, "kv_cache_dtype": "fp8_e4m3"}, lambda llm: float8(llm, scales),
                                warm_up=False))
        print(f"[bench] {name}: float8 with {scales} scales in {time.perf_counter() - start:.1f} s: {rows[-1]}",
              flush=True)
    return rows


def run(args) -> list[dict]:
    """The float8 KV cache against a cache in the model's dtype on each of --presets: random prompts with
    lengths in [--min-len, --max-len], greedy, with per-head scales (the engine's) and per-layer scales
    (each layer's largest head scale)."""
    rng = Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        models = {name: path for preset in args.presets.split(",")
                  for name, path in quality_models(preset, workdir).items()}
        for name, model in models.items():
            vocab = vocab_size(model)
            max_len = min(args.max_len, 400) if name.startswith("hf-parity") else args.max_len  # 512 positions
            lengths = [rng.randint(min(args.min_len, max_len), max_len) for _ in range(args.quality_prompts)]
            prompts = [random_prompt(rng, n, vocab) for n in lengths]
            options = {"max_model_len": max_len + args.quality_tokens + 16, "max_num_seqs": args.quality_prompts,
                       "attention_backend": "triton" if on_gpu() else "torch",
                       "async_scheduling": False}  # teacher forcing
            rows += model_rows(name, model, prompts, options, args)
    print(f"\nfloat8 KV cache against the model's dtype: {args.quality_prompts} prompts x {args.quality_tokens} "
          f"tokens, prompt lengths in [{args.min_len}, {args.max_len}], seed {args.seed}; device {device_name()}")
    print_table(rows, list(rows[0].keys()))
    return rows
