"""The distributed recipe on N local processes without paying torchrun's start-up for each run.

``tune run --nproc_per_node 2`` costs about 20 s on 2 cores before the first step: the ``tune`` launcher imports
torchtune (torchao pulls in inductor), then each worker imports it again. The equivalence tests launch the recipe a
dozen times, so they fork their workers from a ``multiprocessing`` fork server that imported the recipe once. Each
worker gets torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, one intra-op thread as torchrun sets by default) and calls the recipe's ``recipe_main`` with the
command line ``tune run`` would give it, so the recipe runs the code path it runs under torchrun.

What this does not do is torchrun's job management (stopping the other workers when one fails, forwarding
signals, its exit status): tests of that launch ``tune run`` itself (``torchtune_kd.tune_cli``).
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Mapping, Optional, Union

DISTRIBUTED_RECIPE_MODULE = "recipes.knowledge_distillation_distributed"
# What the fork server imports once: the recipes that run on several processes.
PRELOADED = (DISTRIBUTED_RECIPE_MODULE, "recipes.cache_teacher")

_context: Optional[multiprocessing.context.BaseContext] = None


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """``returncode``: 0 when every rank exited 0, else 1 (torchrun's convention); ``stdout``: each rank's stdout and
    stderr, rank 0 first; ``rank_codes``: each rank's own exit status."""

    returncode: int
    stdout: str
    rank_codes: tuple[int, ...]


def _fork_context() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        # Imported once, in the server; every worker is a fork of it.
        context.set_forkserver_preload(list(PRELOADED))
        _context = context
    return _context


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, recipe_file: str, config: str, log: str,
            env: Mapping[str, str]) -> None:
    """One rank: torchrun's environment, output to ``log``, then the recipe's entry point; exits with its status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
    })
    code = 1
    try:
        import torch

        torch.set_num_threads(1)
        sys.argv = [recipe_file, "--config", config]
        importlib.import_module(module).recipe_main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker's last word, as torchrun's error file would show it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_distributed_recipe(
    config: Union[str, Path],
    *,
    nproc: int = 2,
    recipe_file: str = "recipes/knowledge_distillation_distributed.py",
    module: str = DISTRIBUTED_RECIPE_MODULE,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 300,
) -> LaunchResult:
    """Run the distributed recipe on ``nproc`` local processes with the config file ``config``.

    Args:
        config (Union[str, Path]): the YAML the recipe reads (as ``--config``).
        nproc (int): processes (ranks).
        recipe_file (str): what the recipe sees as its ``argv[0]``.
        module (str): the recipe's module (one of :data:`PRELOADED` starts at once).
        env (Optional[Mapping[str, str]]): extra environment of every worker.
        timeout (float): seconds before every worker still running is killed (the result then says so).

    Returns:
        LaunchResult: the job's status and output.
    """
    context = _fork_context()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="kd_launch_") as logs:
        paths = [str(Path(logs) / f"rank{rank}.log") for rank in range(nproc)]
        workers = [
            context.Process(target=_worker, args=(rank, nproc, port, module, recipe_file, str(config), paths[rank],
                                                  dict(env or {})))
            for rank in range(nproc)
        ]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(deadline - time.monotonic(), 0.0))
        timed_out = [worker for worker in workers if worker.is_alive()]
        for worker in timed_out:
            worker.kill()
            worker.join()
        codes = tuple(worker.exitcode if worker.exitcode is not None else -9 for worker in workers)
        output = "".join(
            f"[rank {rank}]\n" + Path(path).read_text(errors="replace") if Path(path).exists() else ""
            for rank, path in enumerate(paths)
        )
    if timed_out:
        output += f"\n[killed after {timeout} s: ranks {[workers.index(w) for w in timed_out]}]\n"
    return LaunchResult(returncode=0 if all(code == 0 for code in codes) else 1, stdout=output, rank_codes=codes)
