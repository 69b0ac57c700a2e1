import multiprocessing as mp
import socket
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(config: Config, rank: int, init_method: str, conn: Connection) -> None:
    """A tensor-parallel rank > 0: mirrors every call that rank 0 makes on its runner."""
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
        for rank in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(config, rank, self.init_method, child), daemon=True)
            process.start()
            self.conns.append(parent)
            self.processes.append(process)

    def wait_ready(self) -> None:
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("a tensor-parallel worker failed to start")

    def broadcast(self, method: str, *args) -> None:
        for conn in self.conns:
            conn.send((method, args))

    def close(self) -> None:
        self.broadcast("exit")
        for process in self.processes:
            process.join(timeout=30)
        # Rank 0 lives in this process: without this, later engines here would see a TP group.
        if dist.is_initialized():
            dist.destroy_process_group()
