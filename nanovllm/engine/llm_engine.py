import numbers
import threading
import time
from collections.abc import Iterable

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.requests import Requests
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_loop import SequentialLoop, StepLoop
from nanovllm.engine.tokenizer import load_tokenizer
from nanovllm.sampling_params import SamplingParams


class LLMEngine:
    """Requests in and out: check them (engine/requests.py), queue them, step the loop, report their
    tokens. How the steps run is the StepLoop's business (build_loop); this class is the same for every
    mode."""

    def __init__(self, model: str, device=None, dtype=None, **options):
        start = time.perf_counter()
        config = Config.from_options(model, device, dtype, **options)
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.requests = Requests(config, self.tokenizer)
        self.loop: StepLoop = self.build_loop(config, self.tokenizer)
        # One step at a time: the runner's buffers and the forward context are not shareable.
        self._lock = threading.RLock()
        self._streamed: dict[int, Sequence] = {}  # from add_request(), not yet finished
        self._closed = False
        self.startup_seconds = time.perf_counter() - start

    def build_loop(self, config: Config, tokenizer) -> StepLoop:
        return SequentialLoop(config, tokenizer)

    @property
    def scheduler(self) -> Scheduler:
        return self.loop.scheduler

    @property
    def runners(self) -> list[ModelRunner]:
        """This process's model runners; the one that decodes comes last."""
        return self.loop.runners

    @property
    def model_runner(self) -> ModelRunner:
        """The runner that decodes."""
        return self.loop.runners[-1]

    def exit(self) -> None:
        """Releases the graphs and the worker processes; the engine cannot run afterwards."""
        with self._lock:
            self.loop.close()
            self._closed = True

    def statistics(self) -> dict:
        """What the engine did, as one dict for every mode: "mode", the seconds the engine took to start
        ("startup_s"), the decoding runner's under "runner" (its start-up phases, its decode path per batch
        bucket, the pipeline's statistics where it is on), and the two-runner modes' under "pd"."""
        with self._lock:
            return {**self.loop.statistics(), "startup_s": self.startup_seconds}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine has exited (exit() was called): create a new LLM to generate")

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queues one request; returns its id, which step() reports its tokens under."""
        seq = self.requests.sequence(prompt, sampling_params)
        with self._lock:
            self._check_open()
            self.loop.add(seq)
            self._streamed[seq.seq_id] = seq
        return seq.seq_id

    def step(self) -> list[tuple[int, list[int], bool]]:
        """Runs one step; returns (request_id, new_token_ids, finished) for every request that produced
        tokens in it ([] when there is nothing to run). A step that does not return normally removes the
        requests whose tokens it had in flight."""
        with self._lock:
            self._check_open()
            try:
                produced = self.loop.step()
            except BaseException:
                self._streamed = {i: seq for i, seq in self._streamed.items() if not seq.is_finished}
                raise
            outputs = [(seq.seq_id, tokens, seq.is_finished) for seq, tokens in produced]
            for seq_id, _, finished in outputs:
                if finished:
                    self._streamed.pop(seq_id, None)
            return outputs

    def has_unfinished_requests(self) -> bool:
        return self.loop.has_unfinished()

    def abort_requests(self, request_ids: int | Iterable[int]) -> None:
        """Drops unfinished requests (one id or several) and frees their KV blocks; unknown or finished ids
        are ignored."""
        if isinstance(request_ids, numbers.Integral) and not isinstance(request_ids, bool):
            request_ids = [request_ids]
        elif not isinstance(request_ids, Iterable) or isinstance(request_ids, (str, bytes)):
            raise TypeError(f"request_ids must be a request id or an iterable of them, got {request_ids!r}")
        ids = set(request_ids)
        with self._lock:
            self.loop.abort(ids)
            for request_id in ids:
                self._streamed.pop(request_id, None)

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams], use_tqdm: bool = True) -> list[dict]:
        """Runs the prompts to completion and returns their outputs in prompt order. Calls from several
        threads are serialised; if the call does not return normally (an exception, KeyboardInterrupt),
        its requests are removed from the engine."""
        if not isinstance(use_tqdm, bool):
            raise TypeError(f"use_tqdm must be a bool, got {use_tqdm!r}")
        seqs = self.requests.batch(prompts, sampling_params)
        with self._lock:
            self._check_open()
            if self._streamed:
                raise RuntimeError("generate() cannot run while requests added with add_request() are unfinished: "
                                   "call step() until has_unfinished_requests() is False, or abort_requests() them")
            try:
                self._run_to_completion(seqs, use_tqdm)
            except BaseException:
                self.loop.abort({seq.seq_id for seq in seqs})
                raise
        return [self._output(seq) for seq in seqs]

    def _run_to_completion(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        for seq in seqs:
            self.loop.add(seq)
        # Counted in tokens, so that the bar moves with every step; a request that stops early
        # takes its unused budget off the total.
        max_model_len = self.config.scheduler.max_model_len
        budget = {seq.seq_id: min(seq.max_tokens, max_model_len - seq.num_prompt_tokens) for seq in seqs}
        bar = tqdm(total=sum(budget.values()), desc="Generating", unit="tok", dynamic_ncols=True, disable=not use_tqdm)
        done = 0
        while self.loop.has_unfinished():
            produced = self.loop.step()
            for seq, _ in produced:
                if seq.is_finished:
                    done += 1
                    bar.total -= budget[seq.seq_id] - seq.num_completion_tokens
            bar.set_postfix_str(f"{done}/{len(seqs)} requests", refresh=False)
            bar.update(sum(len(tokens) for _, tokens in produced))
        bar.close()

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        if seq.stop_strings is not None and seq.stop_strings.matched:
            text = seq.stop_strings.text  # the stop string and what follows are left out
        else:
            text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
        return {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason}

