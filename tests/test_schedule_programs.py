"""Every built-in schedule, expanded and lowered, runs to completion under NCCL's rules.

The captured step of a 4-block GPT goes through the strategy passes for each
schedule, pipeline size and microbatch count; `verify-exec` (the last pass)
pairs every transfer in issue order and simulates all rank programs under
rendezvous semantics (a send completes only once its receive has started,
streams run in order, hosts block at waits). The test also checks what the
programs must show: crossing transfers batched, no tensor held past its last use.
"""

import pytest

from piperc.dialects import exec as ex
from piperc.dialects.torch import ValueTensorType
from piperc.examples import gpt
from piperc.frontend import capture
from piperc.passes.verify_exec import check_pairing, simulate
from piperc.passmanager import run_pipeline


@pytest.fixture(scope="module")
def captured():
    model, (tokens, targets) = gpt.make(n_layers=4, d_model=16, n_heads=2, seq=8, batch=8)
    return capture(model, (tokens[:1], targets[:1]))


def lowered(captured, pp: int, microbatches: int, kind: str):
    module = captured.module.clone()
    pipeline = (
        f'fold-detach,mesh{{shape="pp={pp},dp=2"}},pipeline-split{{stages={pp}}},outline-stages,'
        f'optimizer{{kind="adamw" lr=0.001}},data-parallel,microbatch{{count={microbatches} replicas=2}},'
        f'schedule{{kind="{kind}"}},expand-schedule,lower-to-exec,verify-exec'
    )
    run_pipeline(module, captured.ctx, pipeline)
    return module


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("microbatches", [1, 4, 8])
def test_builtin_schedule_programs_complete_under_rendezvous_semantics(captured, kind, pp, microbatches):
    module = lowered(captured, pp, microbatches, kind)
    programs = [op for op in module.ops if isinstance(op, ex.ProgramOp)]
    assert len(programs) == 2 * pp
    check_pairing(module)
    simulate(module)  # raises, naming each blocked rank's op, on a deadlock
    # Each direction between two ranks has its own group and stream (lower-to-exec's
    # channels), so the forward sends and backward receives that cross between neighbours
    # need no batch: rank 0 sends to rank 2 (its pipeline neighbour, dp=2) on @p2p_0_2 from
    # stream "to2" and receives from it on @p2p_2_0 on "from2".
    ops = list(programs[0].body.block.ops)
    assert not any(isinstance(op, ex.BatchP2POp) for program in programs for op in program.body.block.ops)
    assert {(op.group.root_reference.data, op.stream.owner.stream_name.data)
            for op in ops if isinstance(op, ex.SendOp | ex.RecvOp)} == {("p2p_0_2", "to2"), ("p2p_2_0", "from2")}


def test_no_tensor_outlives_its_last_use(captured):
    """In a pp=2 x dp=2 program every tensor is freed right after its last use, or, when an
    asynchronous op still holds it, right after that op's wait (only other waits and frees
    stand between)."""
    module = lowered(captured, 2, 4, "1f1b")
    for program in (op for op in module.ops if isinstance(op, ex.ProgramOp)):
        ops = list(program.body.block.ops)
        position = {op: i for i, op in enumerate(ops)}
        freed_at = {v: i for i, op in enumerate(ops) if isinstance(op, ex.FreeOp) for v in op.buffers}
        for op in ops:
            for v in op.results:
                if isinstance(v.type, ValueTensorType):
                    assert v in freed_at, f"{program.sym_name.data}: the result of {op.name} #{position[op]} is never freed"
        waited_at = {w: i for i, op in enumerate(ops) if isinstance(op, ex.WaitOp) for w in op.works}
        for v, free in freed_at.items():
            uses = [u.operation for u in v.uses if not isinstance(u.operation, ex.FreeOp)]
            # An asynchronous op holds what it reads until its wait.
            holds = [waited_at[u.results[0]] for u in uses
                     if u.results and isinstance(u.results[0].type, ex.WorkType) and u.results[0] in waited_at]
            last = max([position[u] for u in uses] + holds, default=position[v.owner])
            between = ops[last + 1 : free]
            assert all(isinstance(o, ex.WaitOp | ex.FreeOp) for o in between), (
                f"{program.sym_name.data}: {v.name_hint or v.owner.name} is freed at #{free}, "
                f"its last use is #{last}, with {[o.name for o in between]} between"
            )
