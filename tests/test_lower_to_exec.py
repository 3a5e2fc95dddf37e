"""lower-to-exec, IR text in and IR text out: hand-written `par.program`s become rank programs.

Every test writes the per-device `par.program`s that expand-schedule would write, runs
`lower-to-exec` (and `verify-exec`, which checks that the rank programs pair up and run to
the end under NCCL's rules), and compares a whole `exec.program`. All tensors have one
type, `T = !torch.vtensor<[2,4],f32>`, so the programs read like the schedule they run.
"""

import json
import re
import textwrap

import pytest
import torch

from piperc.codegen import generate
from piperc.errors import PassError, StrategyError
from piperc.ir import make_context, parse_module, print_ir
from piperc.passmanager import run_pipeline
from piperc.runtime import read_manifest, shard
from piperc.runtime.comm import Runtime

T = "!torch.vtensor<[2,4],f32>"
REPLICATED = "#par.sharding<[[], []]>"
ROWS = '#par.sharding<[["dp"], []]>'


def ir(text: str) -> str:
    return textwrap.dedent(text).strip().replace("T", T) + "\n"


def module(mesh: str, functions: dict[str, tuple[list[str], list[str]]], programs: str) -> str:
    """A module with `mesh`, one function per entry (name: argument keys, result keys; the body
    returns its first argument) and the `par.program`s, written with `T` for the tensor type."""
    lines = ["builtin.module {", f"  par.mesh @mesh #par.mesh<[{mesh}]>"]
    for name, (args, results) in functions.items():
        def attrs(key: str) -> str:
            return f'{{par.layout = {REPLICATED}, piperc.key = "{key}"}}'
        signature = ", ".join(f"%a{i}: T {attrs(k)}" for i, k in enumerate(args))
        outs = ", ".join(f"T {attrs(k)}" for k in results)
        first = ", ".join(["%a0"] * len(results))
        lines += [f"  func.func @{name}({signature}) -> ({outs}) {{",
                  f"    func.return {first} : {', '.join(['T'] * len(results))}", "  }"]
    lines += ["  " + line for line in textwrap.dedent(programs).strip().splitlines()]
    return "\n".join(lines + ["}"]).replace("T", T) + "\n"


def lower(text: str, pipeline: str = "lower-to-exec,verify-exec") -> str:
    ctx = make_context()
    m = parse_module(text, ctx)
    run_pipeline(m, ctx, pipeline)
    return print_ir(m)


def section(text: str, head: str) -> str:
    """The op of `text` that begins with `head` (`exec.program @rank0`), through its closing brace."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(head + " "))
    end = lines.index("  }", start)
    return textwrap.dedent("\n".join(lines[start : end + 1])) + "\n"


def groups(text: str) -> list[str]:
    return re.findall(r"^  (exec\.process_group .*)$", text, re.MULTILINE)


# ---------------------------------------------------------------- a two-device pipeline

# 1F1B on two devices, two microbatches. Device 0 sends microbatch 1's activation and
# receives microbatch 0's gradient in one batch (batch 0); device 1 sends that gradient and
# receives that activation in its own batch 0. Each direction numbers its messages 0, 1, ...
PIPELINE = module(
    '"pp"=2',
    {"s0_F": (["input:0", "param:w0"], ["v0"]), "s0_B": (["input:0", "param:w0", "grad:v0"], ["grad:w0"]),
     "s0_B_accumulate": (["grad:w0", "grad:w0"], ["grad:w0"]), "s0_update": (["param:w0", "grad:w0"], ["param:w0"]),
     "s1_F": (["v0", "param:w1"], ["loss_share"]), "s1_B": (["v0", "param:w1"], ["grad:v0"]),
     "s1_accumulate_loss": (["loss_share", "loss_share"], ["loss_share"])},
    """
    par.program @device0 device 0 {
      %w = par.state "w0" layout #par.sharding<[[], []]> : T
      %x0 = par.input 0 microbatch 0 layout #par.sharding<[[], []]> : T
      %y0 = par.task @s0_F stage 0 pass F microbatch 0 (%x0, %w) : (T, T) -> T
      par.send %y0 to 1 "s0_F.0 mb0" : T
      %x1 = par.input 0 microbatch 1 layout #par.sharding<[[], []]> : T
      %y1 = par.task @s0_F stage 0 pass F microbatch 1 (%x1, %w) : (T, T) -> T
      par.send %y1 to 1 "s0_F.0 mb1" batch 0 : T
      %d0 = par.recv from 1 "s1_B.0 mb0" batch 0 : T
      %g0 = par.task @s0_B stage 0 pass B microbatch 0 (%x0, %w, %d0) : (T, T, T) -> T
      %d1 = par.recv from 1 "s1_B.0 mb1" : T
      %g1 = par.task @s0_B stage 0 pass B microbatch 1 (%x1, %w, %d1) : (T, T, T) -> T
      %g = par.task @s0_B_accumulate stage 0 pass B microbatch 1 (%g0, %g1) : (T, T) -> T
      %w2 = par.task @s0_update stage 0 pass update (%w, %g) : (T, T) -> T
      par.set_state "w0", %w2 : T
    }
    par.program @device1 device 1 {
      %w = par.state "w1" layout #par.sharding<[[], []]> : T
      %h0 = par.recv from 0 "s0_F.0 mb0" : T
      %l0 = par.task @s1_F stage 1 pass F microbatch 0 (%h0, %w) : (T, T) -> T
      %dh0 = par.task @s1_B stage 1 pass B microbatch 0 (%h0, %w) : (T, T) -> T
      par.send %dh0 to 0 "s1_B.0 mb0" batch 0 : T
      %h1 = par.recv from 0 "s0_F.0 mb1" batch 0 : T
      %l1 = par.task @s1_F stage 1 pass F microbatch 1 (%h1, %w) : (T, T) -> T
      %dh1 = par.task @s1_B stage 1 pass B microbatch 1 (%h1, %w) : (T, T) -> T
      par.send %dh1 to 0 "s1_B.0 mb1" : T
      %l = par.task @s1_accumulate_loss stage 1 pass F microbatch 1 (%l0, %l1) : (T, T) -> T
      par.output "loss", %l : T
    }
    """,
)


def test_a_pipeline_sends_and_receives_on_the_streams_and_groups_of_each_direction():
    out = lower(PIPELINE)
    # One group per direction (a channel), so a blocked send never holds a receive.
    assert groups(out) == ["exec.process_group @p2p_0_1 ranks [0, 1]", "exec.process_group @p2p_1_0 ranks [0, 1]"]
    assert "par.program" not in out
    # A send is ordered after the launch that made its tensor (event), records the tensor on
    # its direction's stream ("to1"), and is waited on that stream once a receive shows the
    # peer has posted the send's receive (rank 0's mb1 activation: at the gradient of mb1,
    # which device 1 sends after receiving mb1), its tensor freed right after; rank 1's
    # gradients wait to the end, as device 0 sends nothing after receiving them. A received tensor ("from1") is
    # waited on compute before its first use and recorded there. The par batches (a send
    # and a receive issued together) need no batch_p2p: the two directions do not share a
    # stream or a communicator. No collective, so no "comm" stream.
    assert section(out, "exec.program @rank0") == ir(
        """
        exec.program @rank0 rank 0 world 2 {
          %0 = exec.stream "compute"
          %1 = exec.stream "to1"
          %2 = exec.stream "from1"
          %3 = exec.state "w0" : !torch.vtensor<[2,4],f32>
          %4 = exec.load_input "0" microbatch 0 layout #par.sharding<[[], []]> : !torch.vtensor<[2,4],f32>
          %5 = exec.launch @s0_F(%4, %3) on %0 stage 0 pass "F" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          %6 = exec.event_record %0
          exec.event_wait %1, %6
          exec.record_stream %5, %1 : !torch.vtensor<[2,4],f32>
          %7 = exec.send %5 to 1 group @p2p_0_1 tag 0 on %1 : !torch.vtensor<[2,4],f32>
          %8 = exec.load_input "0" microbatch 1 layout #par.sharding<[[], []]> : !torch.vtensor<[2,4],f32>
          %9 = exec.launch @s0_F(%8, %3) on %0 stage 0 pass "F" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          %10 = exec.event_record %0
          exec.event_wait %1, %10
          exec.record_stream %9, %1 : !torch.vtensor<[2,4],f32>
          %11 = exec.send %9 to 1 group @p2p_0_1 tag 1 on %1 : !torch.vtensor<[2,4],f32>
          %12, %13 = exec.recv from 1 group @p2p_1_0 tag 0 on %2 : !torch.vtensor<[2,4],f32>
          exec.wait %12 on %0
          exec.wait %7 on %1
          exec.free %5 : !torch.vtensor<[2,4],f32>
          exec.record_stream %13, %0 : !torch.vtensor<[2,4],f32>
          %14 = exec.launch @s0_B(%4, %3, %13) on %0 stage 0 pass "B" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %4, %13 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %15, %16 = exec.recv from 1 group @p2p_1_0 tag 1 on %2 : !torch.vtensor<[2,4],f32>
          exec.wait %15 on %0
          exec.wait %11 on %1
          exec.free %9 : !torch.vtensor<[2,4],f32>
          exec.record_stream %16, %0 : !torch.vtensor<[2,4],f32>
          %17 = exec.launch @s0_B(%8, %3, %16) on %0 stage 0 pass "B" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %8, %16 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %18 = exec.launch @s0_B_accumulate(%14, %17) on %0 stage 0 pass "B" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %14, %17 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %19 = exec.launch @s0_update(%3, %18) on %0 stage 0 pass "update" : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %3, %18 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          exec.set_state "w0", %19 : !torch.vtensor<[2,4],f32>
          exec.free %19 : !torch.vtensor<[2,4],f32>
        }
        """
    )
    assert section(out, "exec.program @rank1") == ir(
        """
        exec.program @rank1 rank 1 world 2 {
          %0 = exec.stream "compute"
          %1 = exec.stream "to0"
          %2 = exec.stream "from0"
          %3 = exec.state "w1" : !torch.vtensor<[2,4],f32>
          %4, %5 = exec.recv from 0 group @p2p_0_1 tag 0 on %2 : !torch.vtensor<[2,4],f32>
          exec.wait %4 on %0
          exec.record_stream %5, %0 : !torch.vtensor<[2,4],f32>
          %6 = exec.launch @s1_F(%5, %3) on %0 stage 1 pass "F" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          %7 = exec.launch @s1_B(%5, %3) on %0 stage 1 pass "B" microbatch 0 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %5 : !torch.vtensor<[2,4],f32>
          %8 = exec.event_record %0
          exec.event_wait %1, %8
          exec.record_stream %7, %1 : !torch.vtensor<[2,4],f32>
          %9 = exec.send %7 to 0 group @p2p_1_0 tag 0 on %1 : !torch.vtensor<[2,4],f32>
          %10, %11 = exec.recv from 0 group @p2p_0_1 tag 1 on %2 : !torch.vtensor<[2,4],f32>
          exec.wait %10 on %0
          exec.record_stream %11, %0 : !torch.vtensor<[2,4],f32>
          %12 = exec.launch @s1_F(%11, %3) on %0 stage 1 pass "F" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          %13 = exec.launch @s1_B(%11, %3) on %0 stage 1 pass "B" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %3, %11 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          %14 = exec.event_record %0
          exec.event_wait %1, %14
          exec.record_stream %13, %1 : !torch.vtensor<[2,4],f32>
          %15 = exec.send %13 to 0 group @p2p_1_0 tag 1 on %1 : !torch.vtensor<[2,4],f32>
          %16 = exec.launch @s1_accumulate_loss(%6, %12) on %0 stage 1 pass "F" microbatch 1 : (!torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>) -> !torch.vtensor<[2,4],f32>
          exec.free %6, %12 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
          exec.output "loss", %16 : !torch.vtensor<[2,4],f32>
          exec.free %16 : !torch.vtensor<[2,4],f32>
          exec.wait %9, %15 on %1
          exec.free %7, %13 : !torch.vtensor<[2,4],f32>, !torch.vtensor<[2,4],f32>
        }
        """
    )


# ---------------------------------------------------------------- gradient buckets

# One device, two data-parallel replicas: the backward makes two gradients, reduced as one
# bucket over "dp"; the input is split by rows over "dp".
DATA_PARALLEL = module(
    '"pp"=1, "dp"=2',
    {"s0_F": (["input:0", "param:w"], ["loss_share"]), "s0_B": (["input:0", "param:w"], ["grad:w", "grad:b"]),
     "s0_update": (["param:w", "param:b", "grad:w", "grad:b"], ["param:w", "param:b"])},
    """
    par.program @device0 device 0 {
      %w = par.state "w" layout #par.sharding<[[], []]> : T
      %b = par.state "b" layout #par.sharding<[[], []]> : T
      %x = par.input 0 microbatch 0 layout #par.sharding<[["dp"], []]> : T
      %l = par.task @s0_F stage 0 pass F microbatch 0 (%x, %w) : (T, T) -> T
      %gw, %gb = par.task @s0_B stage 0 pass B microbatch 0 (%x, %w) : (T, T) -> (T, T)
      %rw, %rb = par.all_reduce_bucket 0 stage 0 (%gw, %gb) over @mesh ["dp"] stages [0] : T, T
      %w2, %b2 = par.task @s0_update stage 0 pass update (%w, %b, %rw, %rb) : (T, T, T, T) -> (T, T)
      par.set_state "w", %w2 : T
      par.set_state "b", %b2 : T
      par.output "loss", %l : T
    }
    """,
)


def test_a_bucket_is_one_all_reduce_waited_before_the_update_that_reads_it():
    out = lower(DATA_PARALLEL)
    # One device along "pp": no pipeline group, only the replicas' gradient group.
    assert groups(out) == ["exec.process_group @grad_0 ranks [0, 1]"]
    # The gradients stay alive until the all-reduce that reads them has been waited.
    assert section(out, "exec.program @rank0") == ir(
        """
        exec.program @rank0 rank 0 world 2 {
          %0 = exec.stream "compute"
          %1 = exec.stream "comm"
          %2 = exec.state "w" : T
          %3 = exec.state "b" : T
          %4 = exec.load_input "0" microbatch 0 layout #par.sharding<[["dp"], []]> : T
          %5 = exec.launch @s0_F(%4, %2) on %0 stage 0 pass "F" microbatch 0 : (T, T) -> T
          %6, %7 = exec.launch @s0_B(%4, %2) on %0 stage 0 pass "B" microbatch 0 : (T, T) -> (T, T)
          exec.free %4 : T
          %8 = exec.event_record %0
          exec.event_wait %1, %8
          exec.record_stream %6, %1 : T
          exec.record_stream %7, %1 : T
          %9, %10, %11 = exec.all_reduce %6, %7 group @grad_0 sum on %1 : T, T
          exec.wait %9 on %0
          exec.free %6, %7 : T, T
          exec.record_stream %10, %0 : T
          exec.record_stream %11, %0 : T
          %12, %13 = exec.launch @s0_update(%2, %3, %10, %11) on %0 stage 0 pass "update" : (T, T, T, T) -> (T, T)
          exec.free %2, %3, %10, %11 : T, T, T, T
          exec.set_state "w", %12 : T
          exec.free %12 : T
          exec.set_state "b", %13 : T
          exec.free %13 : T
          exec.output "loss", %5 : T
          exec.free %5 : T
        }
        """
    )
    assert section(out, "exec.program @rank1") == section(out, "exec.program @rank0").replace(
        "@rank0 rank 0", "@rank1 rank 1")


def test_a_tied_weight_bucket_spans_both_stages_and_every_replica():
    # pp=2 x dp=2. Each device reduces its own gradient over its replicas and the tied
    # embedding's partial gradient over every rank that holds stage 0 or 1.
    tied = module(
        '"pp"=2, "dp"=2',
        {"s0_B": (["param:w0"], ["grad:w0", "grad:emb"]), "s1_B": (["param:w1"], ["grad:w1", "grad:emb"])},
        """
        par.program @device0 device 0 {
          %w = par.state "w0" layout #par.sharding<[[], []]> : T
          %g, %e = par.task @s0_B stage 0 pass B microbatch 0 (%w) : (T) -> (T, T)
          %rg = par.all_reduce_bucket 0 stage 0 (%g) over @mesh ["dp"] stages [0] : T
          %re = par.all_reduce_bucket 1 stage 0 (%e) over @mesh ["dp"] stages [0, 1] : T
          par.set_state "w0", %rg : T
          par.set_state "emb", %re : T
        }
        par.program @device1 device 1 {
          %w = par.state "w1" layout #par.sharding<[[], []]> : T
          %g, %e = par.task @s1_B stage 1 pass B microbatch 0 (%w) : (T) -> (T, T)
          %rg = par.all_reduce_bucket 0 stage 1 (%g) over @mesh ["dp"] stages [1] : T
          %re = par.all_reduce_bucket 1 stage 1 (%e) over @mesh ["dp"] stages [0, 1] : T
          par.set_state "w1", %rg : T
          par.set_state "emb", %re : T
        }
        """,
    )
    out = lower(tied)
    # No transfers, so no channels: each bucket group in the order ranks 0, 1, 2, 3 meet them.
    assert groups(out) == [
        "exec.process_group @grad_0 ranks [0, 1]",
        "exec.process_group @grad_1 ranks [0, 1, 2, 3]",
        "exec.process_group @grad_2 ranks [2, 3]",
    ]
    # Results read by the host are waited on compute; both buckets run back to back on comm
    # after one event.
    assert section(out, "exec.program @rank3") == ir(
        """
        exec.program @rank3 rank 3 world 4 {
          %0 = exec.stream "compute"
          %1 = exec.stream "comm"
          %2 = exec.state "w1" : T
          %3, %4 = exec.launch @s1_B(%2) on %0 stage 1 pass "B" microbatch 0 : (T) -> (T, T)
          exec.free %2 : T
          %5 = exec.event_record %0
          exec.event_wait %1, %5
          exec.record_stream %3, %1 : T
          %6, %7 = exec.all_reduce %3 group @grad_2 sum on %1 : T
          exec.record_stream %4, %1 : T
          %8, %9 = exec.all_reduce %4 group @grad_1 sum on %1 : T
          exec.wait %6 on %0
          exec.free %3 : T
          exec.set_state "w1", %7 : T
          exec.free %7 : T
          exec.wait %8 on %0
          exec.free %4 : T
          exec.set_state "emb", %9 : T
          exec.free %9 : T
        }
        """
    )


def test_a_bucket_over_one_rank_is_no_collective():
    single = module(
        '"pp"=1, "dp"=1',
        {"s0_B": (["param:w"], ["grad:w"])},
        """
        par.program @device0 device 0 {
          %w = par.state "w" layout #par.sharding<[[], []]> : T
          %g = par.task @s0_B stage 0 pass B microbatch 0 (%w) : (T) -> T
          %r = par.all_reduce_bucket 0 stage 0 (%g) over @mesh ["dp"] stages [0] : T
          par.set_state "w", %r : T
        }
        """,
    )
    out = lower(single)
    assert groups(out) == []
    assert section(out, "exec.program @rank0") == ir(
        """
        exec.program @rank0 rank 0 world 1 {
          %0 = exec.stream "compute"
          %1 = exec.state "w" : T
          %2 = exec.launch @s0_B(%1) on %0 stage 0 pass "B" microbatch 0 : (T) -> T
          exec.free %1 : T
          exec.set_state "w", %2 : T
          exec.free %2 : T
        }
        """
    )


def test_a_step_collective_over_an_axis_of_one_rank_is_no_collective():
    # zero=3 with reshard_after_forward=False gathers in the step; over dp=1 the gather is the shard
    single = module(
        '"pp"=1, "dp"=1',
        {"s0_F": (["param:w"], ["loss_share"])},
        """
        par.program @device0 device 0 {
          %w = par.state "w" layout #par.sharding<[["dp"], []]> : T
          %whole = par.all_gather %w over @mesh "dp" dim 0 : T -> T
          %l = par.task @s0_F stage 0 pass F microbatch 0 (%whole) : (T) -> T
          par.output "loss", %l : T
        }
        """,
    )
    out = lower(single)
    assert groups(out) == []
    assert section(out, "exec.program @rank0") == ir(
        """
        exec.program @rank0 rank 0 world 1 {
          %0 = exec.stream "compute"
          %1 = exec.state "w" layout #par.sharding<[["dp"], []]> : T
          %2 = exec.launch @s0_F(%1) on %0 stage 0 pass "F" microbatch 0 : (T) -> T
          exec.free %1 : T
          exec.output "loss", %2 : T
          exec.free %2 : T
        }
        """
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text, pipeline, message",
    [
        (DATA_PARALLEL, 'lower-to-exec{device="tpu"}', "lower-to-exec: device must be cpu or cuda, got 'tpu'"),
        (DATA_PARALLEL, 'lower-to-exec{axis="tp"}',
         "lower-to-exec: the pipeline axis 'tp' is not in the mesh ['pp', 'dp']; "
         "name it with lower-to-exec{axis=...}"),
        (re.sub(r"  par\.program.*?\n  }\n", "", DATA_PARALLEL, flags=re.DOTALL), "lower-to-exec",
         "lower-to-exec: the module has no par.program; run expand-schedule first"),
        (PIPELINE.replace("@device1 device 1", "@device1 device 0"), "lower-to-exec",
         "lower-to-exec: par.program @device0 and @device1 are both for device 0"),
        (PIPELINE.replace('to 1 "s0_F.0 mb0"', 'to 0 "s0_F.0 mb0"'), "lower-to-exec",
         'lower-to-exec: par.send "s0_F.0 mb0" in par.program @device0: peer device 0 must be '
         "another device of 0..1 along 'pp'"),
    ],
)
def test_lower_to_exec_rejects(text, pipeline, message):
    with pytest.raises(PassError) as raised:
        lower(text, pipeline)
    assert isinstance(raised.value.__cause__, StrategyError)
    assert str(raised.value.__cause__) == message


# ---------------------------------------------------------------- the layout reaches the runtime


def test_code_generation_writes_each_inputs_layout_into_the_manifest():
    ctx = make_context()
    m = parse_module(DATA_PARALLEL, ctx)
    run_pipeline(m, ctx, "lower-to-exec")
    m.attributes["par.microbatches"] = parse_module("builtin.module attributes {a = 1 : i64} {}").attributes["a"]
    files = generate(m, {})
    manifest = json.loads(files["manifest.json"])
    assert manifest["format"] == 3
    assert manifest["inputs"] == [{"index": 0, "name": "input0", "layout": [["dp"], []]}]
    assert '    input0_mb0 = rt.input(0, 0)  # layout [["dp"], []]' in files["rank1.py"].splitlines()


def test_an_input_split_by_rows_over_dp_gives_each_rank_its_rows(tmp_path):
    manifest = {
        "format": 3, "world_size": 2, "mesh": [["dp", 2]], "device": "cpu",
        "groups": [["world", [0, 1]]],
        "inputs": [{"index": 0, "name": "x", "layout": [["dp"], []]}],
        "microbatches": 2,
        "ranks": [{"rank": r, "program": "rank.py", "coords": {"dp": r}, "inputs": [0], "state": []}
                  for r in range(2)],
        "params": {},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    plan = read_manifest(tmp_path)
    x = torch.arange(16.0).reshape(8, 2)
    assert torch.equal(shard(plan, 0, (x,))[0], x[0:4])
    assert torch.equal(shard(plan, 1, (x,))[0], x[4:8])
    for rank, rows in ((0, x[0:4]), (1, x[4:8])):
        rt = Runtime(rank=rank, world_size=2, device=torch.device("cpu"), coords={"dp": rank}, groups={},
                     timeout=1.0, input_names=["x"], readable_inputs=[0], mesh=plan.mesh,
                     input_layouts=plan.input_layouts, microbatches=2, state={})
        rt._begin_step((x,))
        assert torch.equal(rt.input(0, 0), rows[0:2])
        assert torch.equal(rt.input(0, 1), rows[2:4])
        rt._begin_step((rows,), shard=True)
        assert torch.equal(rt.input(0, 1), rows[2:4])
