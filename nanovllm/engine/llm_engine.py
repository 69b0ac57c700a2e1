import os
import time
import weakref
from dataclasses import fields

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tp_worker import TensorParallelGroup
from nanovllm.sampling_params import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class LLMEngine:

    def __init__(self, model: str, device=None, dtype=None, **options):
        allowed = {f.name for f in fields(Config) if f.init}
        for name in options:
            if name not in allowed:
                raise TypeError(f"unknown option {name!r}; options are: {', '.join(sorted(allowed - {'model'}))}")
        config = Config(model, device=device, dtype=dtype, **options)
        self.config = config
        self.tokenizer = self._load_tokenizer(config.model)
        self.tp_group = TensorParallelGroup(config) if config.tensor_parallel_size > 1 else None
        self.model_runner = ModelRunner(config, config.device, 0, self.tp_group and self.tp_group.init_method)
        if self.tp_group:
            self.tp_group.wait_ready()
            # Stops the worker processes when this engine is collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, TensorParallelGroup.close, self.tp_group)
        self.scheduler = Scheduler(config, self.model_runner.num_kvcache_blocks, self.tokenizer)

    @staticmethod
    def _load_tokenizer(path: str):
        if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(path)

    def exit(self) -> None:
        if self.tp_group:
            self._finalizer()
            self.tp_group = None

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer files: pass prompts as lists of token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab = self.config.hf_config.vocab_size
        if not token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens does not fit max_model_len="
                             f"{self.config.max_model_len} (at most {self.config.max_model_len - 1} prompt tokens)")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        return token_ids

    def _new_sequence(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
        """The request as a sequence, after checking what SamplingParams cannot check alone."""
        if sampling_params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer and {self.config.model} has no tokenizer files: "
                             "leave stop empty (stop_token_ids work without one)")
        vocab = self.config.hf_config.vocab_size
        if any(t >= vocab for t in sampling_params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {list(sampling_params.stop_token_ids)}")
        return Sequence(self.tokenize(prompt), sampling_params)

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        seq = self._new_sequence(prompt, sampling_params)
        self.scheduler.add(seq)
        return seq.seq_id

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """Runs one batch; returns the finished (seq_id, completion) pairs and the number of tokens
        computed (positive for prefill, negative for decode, for throughput accounting)."""
        seqs, is_prefill = self.scheduler.schedule()
        if self.tp_group:
            self.tp_group.broadcast("run", seqs, is_prefill)
        token_ids = self.model_runner.run(seqs, is_prefill)
        num_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)
        self.scheduler.postprocess(seqs, token_ids)
        return [(seq.seq_id, seq.completion_token_ids) for seq in seqs if seq.is_finished], num_tokens

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams], use_tqdm: bool = True) -> list[dict]:
        if not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or not all(isinstance(sp, SamplingParams)
                                                                     for sp in sampling_params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        # Check every prompt before queueing any, so that bad input leaves the engine untouched.
        seqs = [self._new_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
        for seq in seqs:
            self.scheduler.add(seq)
        outputs = {}
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        while not self.is_finished():
            start = time.perf_counter()
            finished, num_tokens = self.step()
            rate = abs(num_tokens) / (time.perf_counter() - start)
            if num_tokens > 0:
                prefill_tps = rate
            else:
                decode_tps = rate
            bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
            for seq_id, token_ids in finished:
                outputs[seq_id] = token_ids
                bar.update(1)
        bar.close()
        results = []
        for seq in seqs:
            token_ids = outputs[seq.seq_id]
            if seq.stop_strings is not None and seq.stop_strings.matched:
                text = seq.stop_strings.text  # the stop string and what follows are left out
            else:
                text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
            results.append({"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason})
        return results
