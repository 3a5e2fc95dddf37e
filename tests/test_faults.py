"""A stalled or dead peer on every communication path ends every rank with an error naming it.

The job is tests/programs/faults/: two ranks whose step launches a stage function, then issues
each kind of communication that generated programs use. Its hook (PIPERC_TEST_FAULT) makes
one rank stall or SIGKILL itself in step 1 where it would issue one kind. Every row of the
matrix is a job of independent worker processes (no launcher ends them), forked from one
process that imported the runtime once, so the whole matrix runs concurrently in about one
timeout; one row runs under torchrun. The last test reads, in one process, how a failed rank
follows its peers' reports in the job's store to the rank that is stuck.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist

from piperc.runtime.comm import Runtime, Work

REPO = Path(__file__).resolve().parents[1]
PROGRAM = Path(__file__).parent / "programs" / "faults"
TIMEOUT = 3  # PIPERC_TIMEOUT of every row
LIMIT = TIMEOUT + 30  # every rank must have exited this long after the fault

# The communication the other rank, {t}, fails in when rank {f} stalls or dies at each fault
# point of the program (rank.py issues them in this order; a rank's send carries its rank as tag).
FAILS_IN = {
    "stage": "send to rank {f} (tag {t}, group dp_0)",
    "send": "recv from rank {f} (tag {f}, group dp_0)",
    "recv": "send to rank {f} (tag {t}, group dp_0)",
    "batch_p2p": "batch of 1 send(s) and 1 recv(s) with ranks [{f}] (group dp_0)",
    "all_reduce": "all_reduce sum of 1 tensor(s) over group dp_0",
    "all_gather": "all_gather along dim 0 over group dp_0",
    "reduce_scatter": "reduce_scatter avg along dim 1 over group dp_0",
    "all_to_all": "all_to_all split 1 concat 0 over group dp_0",
    "broadcast": "broadcast from rank 1 over group world",
    "loss": "all_reduce of the step's loss over group world",
}
# (fault point, action, faulty rank): every point with both actions at rank 1, and rank 0,
# which serves the job's store, dying in a collective and stalling at a receive.
ROWS = [(kind, action, 1) for kind in FAILS_IN for action in ("stall", "die")]
ROWS += [("all_reduce", "die", 0), ("recv", "stall", 0)]
TORCHRUN_ROW = ("all_gather", "stall", 1)

# Runs worker.main for every rank of every job (argv[1], JSON) in forked children of one process,
# so that torch is imported once, and appends to argv[2] a JSON line as each child ends: its job,
# rank, exit code and time.time(). Jobs start 0.2 s apart: on one core, 46 ranks joining their
# rendezvous at once left the last job's rank 0 waiting past the rows' 3 s timeout for its peer
# (DistStoreError at init, before any fault), twice in four full runs on 2026-12-01.
FORK_RANKS = textwrap.dedent(
    """
    import json, os, sys, time

    import piperc.runtime.worker as worker

    children = {}
    for job in json.load(open(sys.argv[1])):
        for rank, spec in enumerate(job["ranks"]):
            pid = os.fork()
            if pid == 0:
                try:
                    for fd, path in ((1, spec["stdout"]), (2, spec["stderr"])):
                        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                    os.environ.update(spec["env"])
                    worker.main(spec["argv"])
                finally:
                    os._exit(3)
            children[pid] = (job["name"], rank)
        time.sleep(0.2)  # the next job's ranks start while this one's wait: no 46 ranks in one rendezvous rush
    with open(sys.argv[2], "a") as ended:
        while children:
            pid, status = os.wait()
            name, rank = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            ended.write(json.dumps({"job": name, "rank": rank, "code": code, "at": time.time()}) + "\\n")
            ended.flush()
    """
)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now, below the ephemeral range, where the gloo connections
    of the jobs started before cannot take them."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: set[int] = set()
    while len(ports) < count:
        port = random.randrange(low // 2, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.add(port)
    return list(ports)


def row_name(row: tuple[str, str, int]) -> str:
    """The row as the program's hook spells it: KIND:ACTION:RANK."""
    return ":".join(map(str, row))


def forked_jobs(tmp_path: Path, argv: list[str]) -> list[dict]:
    """FORK_RANKS's input: each row of ROWS as a job of two ranks on a port of its own."""
    jobs = []
    for row, port in zip(ROWS, free_ports(len(ROWS)), strict=True):
        name = row_name(row)
        env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PIPERC_TEST_FAULT": name}
        ranks = [
            {"stdout": str(tmp_path / f"{name}.rank{r}.out"), "stderr": str(tmp_path / f"{name}.rank{r}.err"),
             "argv": argv, "env": {**env, "RANK": str(r), "LOCAL_RANK": str(r)}}
            for r in range(2)
        ]  # fmt: skip
        jobs.append({"name": name, "ranks": ranks})
    return jobs


def fault_time(stderr: str) -> float | None:
    """When the faulty rank stalled or died (`time.time()`, as the program wrote it)."""
    found = re.search(r"^piperc-test-fault (\S+)$", stderr, re.MULTILINE)
    return float(found.group(1)) if found else None


def check_survivor(row: tuple[str, str, int], stderr: str) -> str:
    """What the surviving rank's error lacks: the communication it failed in, the faulty peer."""
    kind, _, faulty = row
    survivor = 1 - faulty
    failed = f"rank {survivor}: {FAILS_IN[kind].format(f=faulty, t=survivor)} failed (timeout {TIMEOUT} s)"
    blamed = rf"rank {survivor}: rank {faulty} is (stalled or dead|gone)"
    missing = [failed] if failed not in stderr else []
    missing += [blamed] if not re.search(blamed, stderr) else []
    return f"rank {survivor}'s error lacks {missing}" if missing else ""


def check_row(tmp_path: Path, row: tuple[str, str, int], exits: dict[int, tuple[int, float]]) -> tuple[str, list[str]]:
    """The row's line of the matrix (each rank's exit code and its time after the fault) and what
    is wrong: an exit code other than 1 (-9 for the dead rank), a rank ending more than LIMIT s
    after the fault, a survivor's error that names not the communication or not the peer."""
    name, faulty = row_name(row), row[2]
    errors = [(tmp_path / f"{name}.rank{r}.err").read_text() for r in range(2)]
    at = fault_time(errors[faulty])
    if at is None:
        return f"{name:24} no fault", [f"{name}: rank {faulty} never reached the fault:\n{errors[faulty][-2000:]}"]
    took = {r: (code, when - at) for r, (code, when) in sorted(exits.items())}
    line = f"{name:24} " + "  ".join(f"rank {r}: {code:3} after {s:5.1f} s" for r, (code, s) in took.items())
    problems = []
    expected = {faulty: -9 if row[1] == "die" else 1, 1 - faulty: 1}
    if {r: code for r, (code, _) in took.items()} != expected:
        problems.append(f"{name}: exit codes {took}, expected {expected}")
    if any(s > LIMIT for _, s in took.values()):
        problems.append(f"{name}: a rank ended more than {LIMIT} s after the fault: {took}")
    wrong = check_survivor(row, errors[1 - faulty])
    if wrong:
        problems.append(f"{name}: {wrong}:\n{errors[1 - faulty][-2000:]}")
    return line, problems


def test_a_stalled_or_dead_peer_ends_every_rank_with_an_error_naming_it(tmp_path):
    job = tmp_path / "job"
    shutil.copytree(PROGRAM, job)
    torch.save({"w": torch.ones(4)}, job / "state.pt")
    torch.save([(torch.randn(4, 4),) for _ in range(3)], tmp_path / "batches.pt")
    argv = [str(job), "--batches", str(tmp_path / "batches.pt")]
    (tmp_path / "jobs.json").write_text(json.dumps(forked_jobs(tmp_path, argv)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPERC_TIMEOUT": str(TIMEOUT),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    with open(tmp_path / "torchrun.out", "wb") as out, open(tmp_path / "torchrun.err", "wb") as err:
        procs = {
            "torchrun": subprocess.Popen(
                [*torchrun, "-m", "piperc.runtime.worker", *argv], stdout=out, stderr=err,
                env={**env, "PIPERC_TEST_FAULT": row_name(TORCHRUN_ROW)}, start_new_session=True,
            ),
            "forked": subprocess.Popen(
                [sys.executable, "-c", FORK_RANKS, str(tmp_path / "jobs.json"), str(tmp_path / "ended.jsonl")],
                env=env, cwd=tmp_path, start_new_session=True,
            ),
        }  # fmt: skip
    ended_at = {}
    try:
        give_up = time.monotonic() + 150
        while len(ended_at) < len(procs) and time.monotonic() < give_up:
            ended_at.update({n: time.time() for n, p in procs.items() if n not in ended_at and p.poll() is not None})
            time.sleep(0.1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    exits = {row_name(row): {} for row in ROWS}
    ended = tmp_path / "ended.jsonl"
    for line in ended.read_text().splitlines() if ended.exists() else []:
        e = json.loads(line)
        exits[e["job"]][e["rank"]] = (e["code"], e["at"])
    table, problems = [], []
    for row in ROWS:
        line, wrong = check_row(tmp_path, row, exits[row_name(row)])
        table.append(line)
        problems += wrong
    stderr = (tmp_path / "torchrun.err").read_text()
    at, code = fault_time(stderr), procs["torchrun"].returncode
    took = float("nan") if at is None or "torchrun" not in ended_at else ended_at["torchrun"] - at
    table.append(f"torchrun {row_name(TORCHRUN_ROW):15} torchrun: {code} after {took:5.1f} s")
    if code in (0, None) or not took <= LIMIT:
        problems.append(f"torchrun: status {code}, {took:.1f} s after the fault")
    wrong = check_survivor(TORCHRUN_ROW, stderr)
    if wrong:
        problems.append(f"torchrun: {wrong}:\n{stderr[-3000:]}")
    print("\n".join(table))
    assert not problems, "\n".join(table + problems)


def test_a_failed_rank_follows_the_reports_to_the_rank_that_is_stuck():
    # Rank 0 of 4 fails in an all_reduce over ranks 0-2. Rank 1 reported the same collective;
    # rank 2 reported that it waits for rank 3, which reported nothing.
    store = dist.HashStore()
    reports = {
        1: {"what": "all_reduce sum of 1 tensor(s) over group trio", "peers": [0, 2], "collective": ["trio", 4]},
        2: {"what": "recv from rank 3 (tag 0, group pair)", "peers": [3], "collective": None},
    }
    for rank, report in reports.items():
        store.set(f"piperc/stuck/rank{rank}", json.dumps(report))
    rt = Runtime(rank=0, world_size=4, device=torch.device("cpu"), coords={"dp": 0}, groups={}, timeout=0.5,
                 input_names=["x"], readable_inputs=[0], mesh={"dp": 4}, input_layouts=[(("dp",), ())],
                 microbatches=1, state={})  # fmt: skip
    work = Work("all_reduce sum of 1 tensor(s) over group trio", [])
    work.peers, work.collective = (1, 2), ("trio", 4)
    assert rt._find_stuck(work, store) == [
        "rank 3 is stalled or dead: it reported no failed communication within 0.5 s",
        "rank 2 is stuck in recv from rank 3 (tag 0, group pair)",
        "ranks [1] fail in the same collective",
    ]
    assert json.loads(store.get("piperc/stuck/rank0")) == {
        "what": "all_reduce sum of 1 tensor(s) over group trio", "peers": [1, 2], "collective": ["trio", 4],
    }
