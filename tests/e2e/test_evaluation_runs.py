"""lm-eval and the evaluation scripts run for real: lm-eval's hellaswag / commonsense_qa / truthfulqa_mc2 tasks on the
project's local data with the tiny stand-in models, re-scored independently (transformers, float64, from the metric
definitions) to show lm-eval scored the folder we gave on the documents we ship; the evaluate and plot_run commands
as subprocesses.
"""

from __future__ import annotations

import csv
import functools
import importlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchtune_kd.evaluation import lm_eval_tasks, tables
from torchtune_kd.testing.crafted_files import NAN_TENSOR, poison, write_disk_log

REPO = Path(__file__).resolve().parents[2]
LIMIT = 8


def _load_script(name: str):
    """The command module behind ``scripts/<name>.py``."""
    return importlib.import_module(f"torchtune_kd.cli.{name}")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_script_refuses_non_finite_weights_before_evaluating(tiny_assets, tmp_path, capsys):
    folder = _copy_model(tiny_assets["student_dir"], tmp_path / "epoch_0")
    poison(folder)
    evaluate = _load_script("evaluate")
    out = tmp_path / "out"
    rc = evaluate.main(["--model", f"ok={tiny_assets['student_dir']}", "--model", f"bad={folder}",
                        "--output-dir", str(out), "--limit", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    folder_name = str(folder.resolve())
    assert f"error: model folder {folder_name!r}: model.safetensors tensor '{NAN_TENSOR}' has 3 non-finite" in err
    assert not (out / "ok").exists()  # refused before the clean model was scored
    # As users run it: exit status 2, the one-line message, no traceback.
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model", str(folder), "--output-dir", str(out),
         "--limit", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"model.safetensors tensor '{NAN_TENSOR}' has 3 non-finite values (NaN/inf)" in proc.stderr
    assert "evaluate an earlier checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def evaluated(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    evaluate = _load_script("evaluate")
    rc = evaluate.main([
        "--model", f"student={tiny_assets['student_dir']}", "--model", f"teacher={tiny_assets['teacher_dir']}",
        "--baseline", "student", "--limit", str(LIMIT), "--batch_size", "8", "--device", "cpu",
        "--data", "offline", "--log-samples", "--output-dir", str(out),
    ])
    assert rc == 0
    return out


def test_evaluate_writes_results_with_every_metric_and_stderr(evaluated):
    for name in ("student", "teacher"):
        results = json.loads((evaluated / name / "results.json").read_text())
        assert results["torchtune_kd"]["data"] == "offline"
        for task, metrics in tables.TASK_METRICS.items():
            assert results["n-samples"][task]["effective"] == LIMIT
            for metric in metrics:
                value = results["results"][task][f"{metric},none"]
                stderr = results["results"][task][f"{metric}_stderr,none"]
                assert isinstance(value, float) and 0.0 <= value <= 1.0
                assert isinstance(stderr, float) and stderr >= 0.0
    rows = list(csv.DictReader(io.StringIO((evaluated / "comparison.csv").read_text())))
    assert len(rows) == 2 * 4 and {r["baseline"] for r in rows} == {"student"}
    md = (evaluated / "comparison.md").read_text()
    assert "NOT the real benchmarks" in md and "| teacher |" in md and "(Δ " in md


@functools.lru_cache(maxsize=2)
def _load_float64(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def _rescore(model_dir: str, pairs: list[list[str]]) -> list[float]:
    """log P(continuation | context) for (context, continuation) pairs, float64, lm-eval's token split.

    All pairs go through one right-padded forward: with causal attention, padding after a sequence cannot change
    the logits at its real positions.
    """
    import torch

    tokenizer, model = _load_float64(model_dir)
    wholes = [tokenizer.encode(context + continuation) for context, continuation in pairs]
    starts = [len(tokenizer.encode(context)) for context, _ in pairs]
    width = max(map(len, wholes))
    ids = torch.tensor([w + [0] * (width - len(w)) for w in wholes])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in wholes])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
    return [
        math.fsum(logprobs[b, i - 1, w[i]].item() for i in range(start, len(w)))
        for b, (w, start) in enumerate(zip(wholes, starts))
    ]


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def test_scores_are_the_given_model_on_the_shipped_documents(evaluated, tiny_assets):
    results = json.loads((evaluated / "student" / "results.json").read_text())["results"]

    # commonsense_qa: acc = mean over documents of [argmax_choice log P(" X" | prompt) == answerKey].
    docs = _jsonl(lm_eval_tasks.OFFLINE_DATA_DIR / "commonsense_qa" / "validation.jsonl")[:LIMIT]
    samples = sorted(_jsonl(evaluated / "student" / "samples_commonsense_qa.jsonl"), key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == docs  # the local file, not the hub dataset
    hits = []
    for sample, doc in zip(samples, docs):
        assert sample["arguments"][0][0].startswith(f"Question: {doc['question']}")
        ll = _rescore(tiny_assets["student_dir"], sample["arguments"])
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(ll, abs=2e-4)
        hits.append(float("ABCDE"[max(range(5), key=ll.__getitem__)] == doc["answerKey"]))
    acc, stderr = _mean_and_stderr(hits)
    assert results["commonsense_qa"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert results["commonsense_qa"]["acc_stderr,none"] == pytest.approx(stderr, abs=1e-12)

    # truthfulqa_mc2: per document, the normalised probability mass of the true answers.
    docs = _jsonl(lm_eval_tasks.OFFLINE_DATA_DIR / "truthfulqa_mc2" / "validation.jsonl")[:LIMIT]
    samples = sorted(_jsonl(evaluated / "student" / "samples_truthfulqa_mc2.jsonl"), key=lambda s: s["doc_id"])
    mass = []
    for sample, doc in zip(samples, docs):
        assert sample["arguments"][0][0].endswith(f"Q: {doc['question']}\nA:")
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in doc["mc2_targets"]["choices"]]
        probs = [math.exp(v) for v in _rescore(tiny_assets["student_dir"], sample["arguments"])]
        mass.append(math.fsum(p for p, label in zip(probs, doc["mc2_targets"]["labels"]) if label) / math.fsum(probs))
    acc, stderr = _mean_and_stderr(mass)
    assert results["truthfulqa_mc2"]["acc,none"] == pytest.approx(acc, abs=1e-4)
    assert results["truthfulqa_mc2"]["acc_stderr,none"] == pytest.approx(stderr, abs=1e-4)

    # The teacher was scored with its own weights: its log-likelihoods differ from the student's.
    teacher = sorted(_jsonl(evaluated / "teacher" / "samples_commonsense_qa.jsonl"), key=lambda s: s["doc_id"])
    assert teacher[0]["resps"] != samples[0]["resps"]


def test_plot_run_one_and_two_runs(tmp_path):
    write_disk_log(tmp_path / "jsd" / "logs" / "log_1.txt", range(1, 11), with_ir=True)
    write_disk_log(tmp_path / "fkl" / "logs" / "log_1.txt", range(1, 11), with_ir=False, offset=0.5)
    plot_run = _load_script("plot_run")
    one = tmp_path / "one.png"
    assert plot_run.main([str(tmp_path / "jsd" / "logs" / "log_1.txt"), "--out", str(one)]) == 0
    # The two-run overlay through the command line, as users run it.
    two = tmp_path / "two.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_run.py"), str(tmp_path / "jsd"), str(tmp_path / "fkl"),
         "--labels", "JSD,forward-KL", "--out", str(two)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss, ce_loss, kd_loss, ir_loss, weight/ce, weight/ir, weight/kd, grad_norm" in proc.stdout
    for png in (one, two):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert one.read_bytes() != two.read_bytes()
    with pytest.raises(SystemExit):
        plot_run.main([str(tmp_path / "jsd"), "--labels", "a,b", "--out", str(tmp_path / "x.png")])
    assert plot_run.main([str(tmp_path / "jsd"), "--metrics", "nothing_here", "--out", str(tmp_path / "x.png")]) == 2
