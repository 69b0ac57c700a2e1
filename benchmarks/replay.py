"""Requests fed through the streaming API (add_request, step) at their arrival times, and the latencies
and rates seen where step() returns the tokens."""
import time
from collections import deque

from tqdm.auto import tqdm

from benchmarks.report import percentile
from nanovllm import LLM


def replay(llm: LLM, arrivals, desc: str, warmup_s: float = 0.0, drain: bool = True) -> dict:
    """Feeds the arrivals through the streaming API in real time; every time is taken when step()
    returns the tokens. TTFT counts from the scheduled arrival, so it includes any queueing.
    Requests arriving in the first warmup_s seconds bring the engine to its load: their first tokens,
    and the gaps that end before warmup_s, are not counted. Without drain the run ends once every request
    has its first token, and the requests still decoding are aborted: their later tokens would come at a
    falling load and flatter the ITL.
    Steps taken while every request had its first token (no prefill queued or running) give the
    decode step time without prefills that the ITL is judged against, with their batch sizes; each
    gap is also divided by that time at the batch of the step that ended it (itl_p99/same_batch_step).
    tok_per_s_measured counts the output tokens that came after warmup_s.
    tok_per_s_mid counts the middle half of the output tokens only, away from the first fill and
    the final drain."""
    pending, arrival, last_seen, done = deque(arrivals), {}, {}, set()
    ttft, itl, itl_batch, num_tokens, measured_tokens, completed = [], [], [], 0, 0, 0
    progress = []  # (seconds, output tokens so far) after each step with outputs
    decode_only_ms, decode_only_batch = [], []
    bar = tqdm(total=sum(params.max_tokens for _, _, params in arrivals), desc=desc, unit="tok", mininterval=1.0)
    start = time.perf_counter()
    while pending or llm.has_unfinished_requests():
        if not drain and not pending and len(last_seen) == len(arrival):
            llm.abort_requests([request_id for request_id in arrival if request_id not in done])
            break
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt, params = pending.popleft()
            arrival[llm.add_request(prompt, params)] = at
        if not llm.has_unfinished_requests():
            time.sleep(pending[0][0] - now)
            continue
        without_prefills = len(last_seen) == len(arrival)
        step_start = time.perf_counter()
        outputs = llm.step()
        if without_prefills and outputs:
            decode_only_ms.append(1e3 * (time.perf_counter() - step_start))
            decode_only_batch.append(len(outputs))
        now = time.perf_counter() - start
        for request_id, new_token_ids, finished in outputs:
            num_tokens += len(new_token_ids)
            if request_id in last_seen:
                gaps = [(now - last_seen[request_id]) / len(new_token_ids)] * len(new_token_ids)
            else:
                if arrival[request_id] >= warmup_s:
                    ttft.append(now - arrival[request_id])
                gaps = [0.0] * (len(new_token_ids) - 1)
            if now >= warmup_s:
                measured_tokens += len(new_token_ids)
                itl += gaps
                itl_batch += [len(outputs)] * len(gaps)
            last_seen[request_id] = now
            if finished:
                completed += 1
                done.add(request_id)
        if outputs:
            progress.append((now, num_tokens))
            bar.update(num_tokens - bar.n)
    seconds = time.perf_counter() - start
    bar.close()
    ms = [1e3 * v for v in itl]
    step_ms = decode_step_by_batch(decode_only_batch, decode_only_ms)
    same_batch = [gap / step_ms(batch) for gap, batch in zip(ms, itl_batch)] if step_ms else []
    return {"requests": len(arrivals), "measured_requests": len(ttft), "seconds": seconds,
            "req_per_s": completed / seconds,
            "tok_per_s": num_tokens / seconds,
            "tok_per_s_measured": measured_tokens / (seconds - warmup_s) if seconds > warmup_s else None,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_ms": percentile(ms, 0.5), "itl_p99_ms": percentile(ms, 0.99), "itl_max_ms": max(ms, default=None),
            "decode_only_steps": len(decode_only_ms), "decode_only_step_p50_ms": percentile(decode_only_ms, 0.5),
            "decode_only_batch_p50": percentile(decode_only_batch, 0.5),
            "itl_p99/same_batch_step": percentile(same_batch, 0.99),
            "tokens_per_step": num_tokens / len(progress) if progress else None, "tok_per_s_mid": middle_rate(progress)}


def decode_step_by_batch(batches: list[int], step_ms: list[float]):
    """The decode step time without prefills as a function of the batch: the least-squares line through
    the decode-only steps; None with fewer than two batch sizes among them."""
    if len(set(batches)) < 2:
        return None
    mean_b, mean_ms = sum(batches) / len(batches), sum(step_ms) / len(step_ms)
    slope = (sum((b - mean_b) * (t - mean_ms) for b, t in zip(batches, step_ms))
             / sum((b - mean_b) ** 2 for b in batches))
    return lambda batch: mean_ms + slope * (batch - mean_b)


def middle_rate(progress: list[tuple[float, int]]) -> float | None:
    """Tokens per second between the steps that passed a quarter and three quarters of the tokens."""
    if not progress:
        return None
    total = progress[-1][1]
    (t0, n0), (t1, n1) = (next(p for p in progress if p[1] >= share * total) for share in (0.25, 0.75))
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None
