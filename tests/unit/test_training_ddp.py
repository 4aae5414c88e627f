"""`specvlm train-draft` under torchrun: two CPU processes (gloo) end with identical draft weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from draft_models.training.distributed import WEIGHTS_DIGEST_ENV
from tiny_models import build_tiny_llava

RECORDS = [
    {
        "image": "blue.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is the color of this picture"},
            {"from": "gpt", "value": "the picture is blue"},
        ],
    },
    {"conversations": [{"from": "human", "value": "is the sky blue"}, {"from": "gpt", "value": "yes the sky is blue"}]},
    {"conversations": [{"from": "human", "value": "is there a dog"}, {"from": "gpt", "value": "no there is a cat"}]},
    {"conversations": "malformed"},
    {"conversations": [{"from": "human", "value": "what is big"}, {"from": "gpt", "value": "the sea is big"}]},
]


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_keep_identical_weights(tmp_path: Path):
    target = build_tiny_llava(tmp_path / "target")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (36, 36), (20, 40, 220)).save(tmp_path / "images" / "blue.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS))
    out, digests = tmp_path / "out", tmp_path / "digests"

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_loopback_port()}",
        "-m", "server.cli", "train-draft",
        "--target", str(target), "--data", str(data), "--image-folder", str(tmp_path / "images"),
        "--eval-data", str(data), "--eval-samples", "2", "--eval-max-tokens", "8",
        "--out", str(out), "--device", "cpu", "--teacher-dtype", "float32",
        "--batch-size", "1", "--max-steps", "3", "--save-every", "2", "--lr", "1e-3",
    ]
    environment = {**os.environ, WEIGHTS_DIGEST_ENV: str(digests), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]

    rank0 = (digests / "rank0.sha256").read_text()
    rank1 = (digests / "rank1.sha256").read_text()
    assert rank0 == rank1
    # Rank 0 alone writes checkpoints, metrics and the final draft.
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics] == [0, 3]
    assert (out / "draft" / "model.safetensors").exists()
    assert "skipping training record 3" in completed.stderr
