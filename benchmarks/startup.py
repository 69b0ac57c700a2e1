"""Start-up time (--startup): where an engine's start goes. Fresh processes each build an engine of the model
and run one short prompt, the first with an empty Triton kernel cache (a new machine, or new kernels) and the
later ones with the cache it left; per process, the import, each start-up phase of the runner
(llm.statistics()["runner"]["startup_s"]), the engine's whole start and the first token."""
import json
import os
import subprocess
import sys
import tempfile
import time

RUNS = ("first (empty kernel cache)", "later", "later")


def child(model: str) -> dict:
    """One process's start, timed from the import of nanovllm."""
    start = time.perf_counter()
    from nanovllm import LLM, SamplingParams
    imported = time.perf_counter() - start
    llm = LLM(model)
    stats = llm.statistics()
    start = time.perf_counter()
    llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(max_tokens=1), use_tqdm=False)
    return {"import_s": imported, **{f"{k}_s": v for k, v in stats["runner"]["startup_s"].items()},
            "engine_s": stats["startup_s"], "first_token_s": time.perf_counter() - start}


def run(args) -> list[dict]:
    # Imported here, not with the module: the child times the import of nanovllm, which these bring in.
    from benchmarks.common import device_name, model_path
    from benchmarks.report import print_table
    model = model_path(args)
    rows = []
    with tempfile.TemporaryDirectory() as kernel_cache:
        env = dict(os.environ, TRITON_CACHE_DIR=kernel_cache, NANOVLLM_LOG_LEVEL="WARNING")
        for run_name in RUNS:
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "benchmarks.startup", model], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows.append({"start": run_name, "process_s": time.perf_counter() - start,
                         **json.loads(out.strip().splitlines()[-1])})
            print(f"[bench] {run_name} start: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                                                          if isinstance(v, float)), flush=True)
    print(f"\nstart-up of {model}, default options, in fresh processes; device {device_name()}")
    print("process_s: the whole process; engine_s: LLM(...); *_s between: the runner's phases; first_token_s: "
          "a one-token generate() after the start")
    print_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
    return rows


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1])))
