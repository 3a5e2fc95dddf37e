"""A saved job runs as two nodes under torchrun, as the README shows, and matches one device.

The two nodes are two torchrun invocations on this machine, 2 processes each, meeting
through the c10d rendezvous at 127.0.0.1. torchrun's c10d rendezvous ignores
--node-rank and gives global ranks in its own order, so either node may hold global
rank 0, the one rank that prints the losses and writes --result: both nodes are given
the same --result path, as on a shared filesystem.
"""

import os
import socket
import subprocess
import sys
import time

import torch

import piperc
from piperc.examples import gpt
from piperc.reference import compare, train_eager
from piperc.runtime.launch import STEP_PREFIX

SIZE = {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq": 8, "batch": 8}
OPTIMIZER = piperc.optim.AdamW(lr=1e-3, weight_decay=0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(port: int, run_id: str, *args: str) -> list[str]:
    """One node's command line, as in the README's multi-node section."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, *args,
    ]  # fmt: skip


def test_two_nodes_match_one_device(tmp_path):
    model, inputs = gpt.make(**SIZE)
    batches = [gpt.make(**SIZE, seed=100 + s)[1] for s in range(2)]
    compiled = piperc.compile(
        model, inputs, mesh=piperc.Mesh(pp=2, dp=2),
        strategy=[piperc.pipeline(stages=2, microbatches=2, schedule="1f1b"), piperc.data_parallel()],
        optimizer=OPTIMIZER, keep_ir=False)  # fmt: skip
    compiled.save(str(tmp_path / "job"))
    torch.save(batches, tmp_path / "batches.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    worker = ["-m", "piperc.runtime.worker", "job", "--batches", "batches.pt", "--result", "result.pt"]
    nodes = [
        subprocess.Popen(torchrun(port, "multinode", "--node-rank", str(node), *worker), cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out + err
    printing = [i for i, (out, _) in enumerate(outputs) if STEP_PREFIX in out]
    assert len(printing) == 1, f"global rank 0 runs on exactly one node, got losses from nodes {printing}"
    saved = torch.load(tmp_path / "result.pt", weights_only=True)
    loss_err, param_err = compare(saved["losses"], saved["state_dict"], *train_eager(model, batches, OPTIMIZER))
    assert loss_err <= 1e-5 and param_err <= 1e-5, (loss_err, param_err)


def test_a_node_that_never_comes_ends_the_other(tmp_path):
    """The rendezvous's join_timeout (torchrun's default: 600 s) bounds the wait for a
    missing node; the node that came exits with an error instead of hanging."""
    start = time.monotonic()
    lone = subprocess.run(
        torchrun(free_port(), "lone", "--rdzv-conf", "join_timeout=3",
                 "-m", "piperc.runtime.worker", "job", "--batches", "batches.pt"),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert lone.returncode != 0
    assert "RendezvousTimeoutError" in lone.stderr
    assert time.monotonic() - start < 60
