import multiprocessing as mp
import socket
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(config: Config, rank: int, init_method: str, conn: Connection) -> None:
    """A tensor-parallel rank > 0: mirrors every launch that rank 0 makes on its runner."""
    conn.send("started")
    device = torch.device("cuda", rank) if config.device.type == "cuda" else config.device
    runner = ModelRunner(config, device, rank, init_method)
    conn.send("ready")
    while True:
        method, args = conn.recv()
        if method == "exit":
            break
        getattr(runner, method)(*args)


class TensorParallelGroup:
    """Starts ranks 1..N-1 in their own processes and forwards rank 0's calls to them."""

    def __init__(self, config: Config):
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.conns, self.processes = [], []
        for rank in range(1, config.parallel.tensor_parallel_size):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(config, rank, self.init_method, child), daemon=True)
            process.start()
            child.close()  # so that a dead worker's end of the pipe reads as closed here
            self.conns.append(parent)
            self.processes.append(process)
        # Before rank 0 joins the process group, which would wait forever for a worker that died.
        self._expect("started")

    def wait_ready(self) -> None:
        self._expect("ready")

    def _expect(self, message: str) -> None:
        for rank, (conn, process) in enumerate(zip(self.conns, self.processes), start=1):
            if conn in wait([conn, process.sentinel]):
                try:
                    if conn.recv() == message:
                        continue
                except EOFError:
                    pass
            process.join(timeout=5)
            self.close()
            raise RuntimeError(
                f"tensor-parallel worker rank {rank} exited (exit code {process.exitcode}) before it was {message}. "
                "Workers are spawned processes that import the main script again: a script that creates "
                "LLM(..., tensor_parallel_size > 1) must do so under `if __name__ == \"__main__\":`. "
                "The worker's own error, if any, is printed above.")

    def broadcast(self, method: str, *args) -> None:
        for conn in self.conns:
            conn.send((method, args))

    def close(self) -> None:
        for conn, process in zip(self.conns, self.processes):
            if process.is_alive():
                conn.send(("exit", ()))
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():  # stuck in a collective that rank 0 left
                process.terminate()
                process.join()
        # Rank 0 lives in this process: without this, later engines here would see a TP group.
        if dist.is_initialized():
            dist.destroy_process_group()
