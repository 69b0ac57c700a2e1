"""The requests the benchmarks send: random prompts and output lengths, seeded, all at once or as Poisson
arrivals."""
from random import Random

from nanovllm import SamplingParams

WORKLOADS = ("default", "prefill-heavy", "steady")


def request_lengths(args) -> tuple[tuple[int, int], tuple[int, int]]:
    """(prompt, output) length ranges of the workload."""
    if args.workload == "prefill-heavy":
        return (1000, 4000), (50, 200)
    return (args.min_len, args.max_len), (args.min_len, args.max_len)


def max_model_len(args) -> int:
    (_, max_in), (_, max_out) = request_lengths(args)
    return max_in + max_out + 16


def describe_workload(args) -> str:
    (min_in, max_in), (min_out, max_out) = request_lengths(args)
    return (f"{args.workload} workload: input lengths uniform in [{min_in}, {max_in}], output lengths in "
            f"[{min_out}, {max_out}], seed {args.seed}, ignore_eos")


def random_prompt(rng: Random, length: int, vocab_size: int) -> list[int]:
    top = min(10000, vocab_size - 1)
    return [rng.randint(0, top) for _ in range(length)]


def random_request(rng: Random, args, vocab_size: int) -> tuple[list[int], SamplingParams]:
    (min_in, max_in), (min_out, max_out) = request_lengths(args)
    prompt = random_prompt(rng, rng.randint(min_in, max_in), vocab_size)
    return prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(min_out, max_out))


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = Random(args.seed)
    requests = [random_request(rng, args, vocab_size) for _ in range(args.num_seqs)]
    return [prompt for prompt, _ in requests], [params for _, params in requests]


def poisson_arrivals(args, rate: float, vocab_size: int) -> list[tuple[float, list[int], SamplingParams]]:
    """Requests arriving at `rate` per second for args.duration seconds, seeded by args.seed."""
    rng = Random(args.seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < args.duration:
        arrivals.append((t, *random_request(rng, args, vocab_size)))
        t += rng.expovariate(rate)
    return arrivals
