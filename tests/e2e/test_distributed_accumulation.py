"""Token-exact accumulation across data-parallel ranks (the training core's part of multi-GPU distillation).

Two gloo processes on CPU each take half of a global batch; with the counts and means summed over ranks and the
backward scaled by the world size, the rank-averaged gradient (what FSDP computes) equals the single-process
gradient of the whole batch, and so do the logged means and the dynamic loss weights. The single-process reference
is itself split two ways (one micro-batch of four samples, four micro-batches of one).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kd_losses
from torchtune_kd.core import distributed, loss_step, loss_weighting

VOCAB, DIM, SEQ, SAMPLES = 13, 6, 7, 4
SCALING = {"enabled": True, "method": "dynamic", "manual_scales": {"ce": 0.5, "kd": 0.3, "ir": 0.2}}


class Toy(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, DIM, generator=generator))
        self.head = torch.nn.Parameter(torch.randn(VOCAB, DIM, generator=generator) * 0.5)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed[tokens]  # (bsz, seq_len, dim)
        return hidden @ self.head.T, hidden


def global_batch() -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    samples = []
    for index in range(SAMPLES):
        tokens = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
        labels = tokens.clone()
        labels[0, : index + 1] = -100  # a different number of counted tokens per sample
        real = torch.ones(1, SEQ, dtype=torch.bool)
        real[0, SEQ - index:] = False  # and of real tokens
        samples.append({"tokens": tokens, "labels": labels, loss_step.REAL_TOKENS_KEY: real})
    return samples


def concat(samples: list[dict]) -> dict:
    return {key: torch.cat([s[key] for s in samples]) for key in samples[0]}


def one_step(micro_batches: list[dict], **kwargs) -> dict:
    """Two optimiser steps' worth of accumulation (weights after the first update too) on fresh toy models."""
    student, teacher = Toy(0), Toy(1).requires_grad_(False)
    kd, ir = kd_losses.ForwardKLLoss(), kd_losses.CosineIRLoss()

    def step(batch: dict) -> dict:
        logits, hidden = student(batch["tokens"])
        with torch.no_grad():
            teacher_logits, teacher_hidden = teacher(batch["tokens"])
        labels = loss_step.shift_labels(batch["labels"], -100)
        sums = {"ce": loss_step.ce_token_sum(logits, labels, -100), "kd": kd.token_sum(logits, teacher_logits, labels)[0]}
        sums["agree"], sums["teacher_entropy"] = loss_step.kd_health_sums(logits, teacher_logits, labels, -100)
        sums["ir"] = ir.token_sum(hidden, teacher_hidden, batch[loss_step.REAL_TOKENS_KEY])[0]
        return sums

    weighting = loss_weighting.LossWeighting.from_config(SCALING, kd_ratio=0.5)
    totals, weights = loss_step.accumulate_gradients(micro_batches, step, weighting, -100, **kwargs)
    grads = [p.grad for p in student.parameters()]
    if kwargs.get("reduce_sum") is not None:  # what FSDP does: average the gradients over ranks
        for grad in grads:
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    weighting.update({c: float(totals[c]) for c in loss_weighting.COMPONENTS if c in totals})
    return {
        "totals": {k: float(v) for k, v in totals.items()},
        "weights": weights,
        "next_weights": weighting.weights(loss_weighting.COMPONENTS),
        "grads": [g.tolist() for g in grads],
    }


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = global_batch()[rank * 2: rank * 2 + 2]
        result = one_step(mine, reduce_sum=distributed.all_reduce_sum, grad_scale=float(world))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same(a: dict, b: dict) -> None:
    assert a["totals"].keys() == b["totals"].keys()
    for key in a["totals"]:
        assert b["totals"][key] == pytest.approx(a["totals"][key], rel=1e-6, abs=1e-7), key
    assert b["weights"] == pytest.approx(a["weights"], rel=1e-12)
    assert b["next_weights"] == pytest.approx(a["next_weights"], rel=1e-6)
    for ga, gb in zip(a["grads"], b["grads"]):
        torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-5, atol=1e-7)


def test_single_process_split_does_not_matter():
    samples = global_batch()
    assert_same(one_step([concat(samples)]), one_step(samples))


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    reference = one_step([concat(global_batch())])
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert_same(reference, result)
    assert reference["totals"]["label_tokens"] == sum(SEQ - 1 - i for i in range(SAMPLES))  # counted targets
