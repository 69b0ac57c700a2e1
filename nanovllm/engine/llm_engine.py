import os
import threading
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
        self.tp_group = None
        self._build(config)
        # One step at a time: the runner's buffers and the forward context are not shareable.
        self._lock = threading.RLock()
        self._streamed: set[int] = set()  # ids from add_request() not yet finished
        # Async scheduling: the launched step whose tokens are not yet known, as (seqs, SampledTokens).
        self._in_flight = None

    def _build(self, config: Config) -> None:
        """Builds the runners and the scheduler; an engine with another execution model overrides this
        and step(), and keeps the request-level API above them."""
        self.tp_group = TensorParallelGroup(config) if config.tensor_parallel_size > 1 else None
        try:
            self.model_runner = ModelRunner(config, config.device, 0, self.tp_group and self.tp_group.init_method)
            if self.tp_group:
                self.tp_group.wait_ready()
        except BaseException:
            if self.tp_group:  # the workers and the process group would outlive the failed engine
                self.tp_group.close()
            raise
        if self.tp_group:
            # Stops the worker processes when this engine is collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, TensorParallelGroup.close, self.tp_group)
        self.scheduler = Scheduler(config, self.model_runner.num_kvcache_blocks, self.tokenizer)

    @staticmethod
    def _load_tokenizer(path: str):
        present = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
        if not present:
            return None
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # each tokenizer file format fails in its own way
            raise ValueError(f"cannot read the tokenizer files {', '.join(present)} in {path}: {e!r}") from None

    @property
    def runners(self) -> list[ModelRunner]:
        """This process's model runners; the one that decodes comes last."""
        return [self.model_runner]

    def exit(self) -> None:
        """Releases the decode graphs and the worker processes; the engine cannot run afterwards."""
        for runner in self.runners:
            runner.close()
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
        """Queues one request; returns its id, which step() reports its tokens under."""
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        seq = self._new_sequence(prompt, sampling_params)
        with self._lock:
            self.scheduler.add(seq)
            self._streamed.add(seq.seq_id)
        return seq.seq_id

    def step(self) -> list[tuple[int, list[int], bool]]:
        """Runs one batch; returns (request_id, new_token_ids, finished) for every request that
        produced tokens in it."""
        with self._lock:
            if self.config.async_scheduling:
                outputs = self._step_ahead()
            else:
                seqs, is_prefill = self.scheduler.schedule()
                if self.tp_group:
                    self.tp_group.broadcast("run", seqs, is_prefill)
                token_ids = self.model_runner.run(seqs, is_prefill)
                outputs = self._outputs(self.scheduler.postprocess(seqs, token_ids))
            self._streamed.difference_update(seq_id for seq_id, _, finished in outputs if finished)
            return outputs

    @staticmethod
    def _outputs(produced: list[Sequence]) -> list[tuple[int, list[int], bool]]:
        return [(seq.seq_id, [seq.last_token], seq.is_finished) for seq in produced]

    def _step_ahead(self) -> list[tuple[int, list[int], bool]]:
        """Launches step N, then waits for the tokens of step N-1, which the device has computed
        meanwhile, and books both: the host plans each step while the device runs the one before.
        Reports the tokens of step N-1."""
        seqs, is_prefill = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        if not seqs and previous is None:
            raise RuntimeError("the scheduler waits for tokens of a step that is not running")
        try:
            launched = None
            if seqs:
                if self.tp_group:
                    self.tp_group.broadcast("run", seqs, is_prefill)
                launched = (seqs, self.model_runner.run(seqs, is_prefill))
            outputs = self._outputs(self.scheduler.fill(previous[0], previous[1].tolist()) if previous else [])
            if launched:
                self.scheduler.book(seqs)
        except BaseException:
            self._abort_lost(seqs, previous[0] if previous else [])
            raise
        # Once every sequence has stopped, no token of the launched step will be used.
        self._in_flight = None if self.scheduler.is_finished() else launched
        return outputs

    def _abort_lost(self, *batches: list[Sequence]) -> None:
        """After a step failed: the tokens in flight are lost with the steps that were to deliver them,
        so the sequences of those batches cannot go on."""
        lost = {seq.seq_id for batch in batches for seq in batch}
        self.scheduler.abort(lost)
        self._streamed.difference_update(lost)

    def has_unfinished_requests(self) -> bool:
        return not self.scheduler.is_finished()

    def abort_requests(self, request_ids) -> None:
        """Drops unfinished requests and frees their KV blocks; unknown or finished ids are ignored."""
        with self._lock:
            self.scheduler.abort(set(request_ids))
            self._streamed.difference_update(request_ids)

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams], use_tqdm: bool = True) -> list[dict]:
        """Runs the prompts to completion and returns their outputs in prompt order. Calls from several
        threads are serialised; if the call does not return normally (an exception, KeyboardInterrupt),
        its requests are removed from the engine."""
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
        with self._lock:
            if self._streamed:
                raise RuntimeError("generate() cannot run while requests added with add_request() are unfinished: "
                                   "call step() until has_unfinished_requests() is False, or abort_requests() them")
            try:
                self._run_to_completion(seqs, use_tqdm)
            except BaseException:
                self.abort_requests([seq.seq_id for seq in seqs])
                raise
        return [self._output(seq) for seq in seqs]

    def _run_to_completion(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        by_id = {seq.seq_id: seq for seq in seqs}
        for seq in seqs:
            self.scheduler.add(seq)
        # Counted in tokens, so that the bar moves with every step; a request that stops early
        # takes its unused budget off the total.
        budget = {seq.seq_id: min(seq.max_tokens, self.config.max_model_len - seq.num_prompt_tokens) for seq in seqs}
        bar = tqdm(total=sum(budget.values()), desc="Generating", unit="tok", dynamic_ncols=True, disable=not use_tqdm)
        done = 0
        while self.has_unfinished_requests():
            outputs = self.step()
            for seq_id, _, finished in outputs:
                if finished:
                    done += 1
                    bar.total -= budget[seq_id] - by_id[seq_id].num_completion_tokens
            bar.set_postfix_str(f"{done}/{len(seqs)} requests", refresh=False)
            bar.update(sum(len(new_token_ids) for _, new_token_ids, _ in outputs))
        bar.close()

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        if seq.stop_strings is not None and seq.stop_strings.matched:
            text = seq.stop_strings.text  # the stop string and what follows are left out
        else:
            text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
        return {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason}
