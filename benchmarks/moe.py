"""Expert parallelism next to dense data parallelism and the masked dense MoE, on 4 CPU ranks.

    python benchmarks/moe.py [--steps 30] [--warmup 3] [--d-model 128] [--layers 4]
        [--experts 8] [--batch 32] [--seq 128]

Three contenders train the same mixture-of-experts decoder (examples/moe.py: rotary attention,
then a routed `piperc.nn.MoE` of SwiGLU experts, hidden 4 * d_model, top-2, capacity factor
1.25, in every block; 4 heads, vocab 256) from the same initial weights on the same global
batches, each a full step with an AdamW update, all compiled by piperc for Mesh(dp=4):

    ep        data_parallel(axis="dp") + expert_parallel(axis="dp"): each rank holds E/4 of a
              layer's experts; its tokens go to the experts' ranks by all-to-all and back
    dense-dp  data_parallel(axis="dp") alone: every rank holds every expert, runs its own
              tokens through them and dispatches nothing; expert gradients are all-reduced
    masked    data_parallel(axis="dp") on the same decoder with each block's MoE swapped for
              `MaskedMoE`, the masked dense form the example used before piperc.nn.MoE: every
              expert runs on every token and the router's top-2 gates mask the results

The default size (4 blocks, d_model 128, 8 experts, seq 128, global batch 32: 6.62M
parameters, 6.29M of them in experts; C = 320 slots per expert per rank) takes 0.6-1.1 s a
step for ep on 2 shared cores and about 2-3 minutes in all.

ep and dense-dp are the same model on the same per-rank slices (capacity is per call, so per
data rank), so their step-0 losses must agree to 1e-5, or the script fails. The masked form
drops no token (it has no capacity), so its losses differ; they are shown, not compared.

Step time: as benchmarks/pipeline_vs_torch.py measures it, with its helpers. Each contender
runs in 4 fresh worker processes (gloo, one thread each) that load the compiled program with
the runtime alone; every step sits between two barriers; a step's time is the slowest
rank's; the table shows the median over the timed steps and its ratio to ep's.

Memory: piperc's runtime's own count, as `piperc.launch`'s `result.peak_memory` reports it:
the parameters and the optimizer state a rank holds, and the peak of the rank's live
tensors (gradients, activations, communication buffers) over the run added to them; each
the largest rank's, in MiB, with its ratio to ep's. The bytes ep's all-to-alls move per step
per rank are predicted from the shapes: per MoE layer per microbatch, the dispatched buffer
[E, C, d] of float32 of which (n-1)/n leaves the rank, in each of four all-to-alls (forward
dispatch and combine, and their two in the backward); the runtime's count of them
(`Runtime.sent_bytes`) is shown next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pipeline_vs_torch import (  # noqa: E402
    LOSS_TOLERANCE,
    WORLD,
    join,
    load_average,
    machine,
    peak_rss_mib,
    print_footer,
    run_pairs,
    summarize,
    timed_steps,
)
from torch import nn  # noqa: E402

import piperc  # noqa: E402
from piperc.examples import gpt, moe  # noqa: E402
from piperc.nn import MoE  # noqa: E402
from piperc.strategy import AdamW  # noqa: E402

N_HEADS = 4
VOCAB = 256
TOP_K = 2
OPTIMIZER = AdamW(lr=1e-3, weight_decay=0.1)
MIB = 2**20
FLOAT_BYTES = 4

CONTENDERS = ("ep", "dense-dp", "masked")
LABELS = {
    "ep": "ep (dp=4 + expert_parallel)",
    "dense-dp": "dense-dp (dp=4, all experts)",
    "masked": "masked (dp=4, masked dense)",
}
MEMORY_ITEMS = ("parameters", "optimizer_state", "peak")
"""The memory columns: the state a rank holds, and its peak (that state plus its live tensors)."""


class MaskedMoE(nn.Module):
    """The masked dense form of a top-k mixture of SwiGLU experts, with `piperc.nn.MoE`'s
    parameters (`router`, stacked `w1`, `w3` [E, d, h] and `w2` [E, h, d]), so it loads an
    MoE's state_dict and stands in for it in the same decoder.

    Every expert runs on every token; the outputs are weighted by a [T, E] gate matrix that
    holds each token's top-k router probabilities (renormalised to sum to 1 when k > 1, as
    MoE's) and zeros elsewhere. No token is dropped: there is no capacity. `forward` returns
    (y, aux_loss) with MoE's load-balancing loss (it counts the assignments before capacity
    drops, so it is the same function of the router's choices).
    """

    def __init__(self, moe_layer: MoE):
        super().__init__()
        self.d_model = moe_layer.d_model
        self.n_experts = moe_layer.n_experts
        self.top_k = moe_layer.top_k
        self.aux_loss_coef = moe_layer.aux_loss_coef
        self.router = nn.Linear(self.d_model, self.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty_like(moe_layer.w1))
        self.w3 = nn.Parameter(torch.empty_like(moe_layer.w3))
        self.w2 = nn.Parameter(torch.empty_like(moe_layer.w2))
        self.load_state_dict(moe_layer.state_dict())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, aux_loss) for `x` of shape [..., d_model]."""
        tokens = x.reshape(-1, self.d_model)
        n_tokens, n_experts, k = tokens.shape[0], self.n_experts, self.top_k
        probs = self.router(tokens).softmax(dim=-1)
        gates, experts = probs.topk(k, dim=-1)
        if k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        gate_matrix = torch.zeros_like(probs).scatter(1, experts, gates)  # [T, E]

        every = tokens.unsqueeze(0).expand(n_experts, n_tokens, self.d_model)  # [E, T, d]
        hidden = torch.nn.functional.silu(torch.bmm(every, self.w1)) * torch.bmm(every, self.w3)
        out = torch.bmm(hidden, self.w2)  # [E, T, d]
        y = (out * gate_matrix.t().unsqueeze(2)).sum(dim=0).view(x.shape)

        assigned = torch.zeros_like(probs).scatter(1, experts, 1.0).sum(dim=0)  # f_e * k * T
        aux_loss = (assigned * probs.mean(dim=0)).sum() * (self.aux_loss_coef * n_experts / (k * n_tokens))
        return y, aux_loss


def new_model(config: dict) -> moe.MoEDecoder:
    """The benchmark's MoE decoder, with freshly initialised weights (seed 0)."""
    model, _ = moe.make(vocab=VOCAB, d_model=config["d_model"], n_heads=N_HEADS, n_layers=config["layers"],
                        seq=config["seq"], batch=1, n_experts=config["experts"], top_k=TOP_K)
    return model


def masked(model: moe.MoEDecoder) -> moe.MoEDecoder:
    """A copy of `model` with every block's MoE swapped for a `MaskedMoE` with its weights."""
    swapped = copy.deepcopy(model)
    for block in swapped.blocks:
        block.moe = MaskedMoE(block.moe)
    return swapped


# ----------------------------------------------------------------------------- worker


def rank_memory(executor) -> dict[str, int]:
    """This rank's memory by the runtime's own count, as `piperc.launch`'s `peak_memory` has it:
    the state it holds by kind, and its peak (that state plus the live count's peak)."""
    runtime = executor.runtime
    held = {"param": 0, "zeros": 0, "scalar": 0}
    for entry in executor.plan.state:
        held[entry.kind] += runtime.state(entry.name).nbytes
    state = held["param"] + held["zeros"] + held["scalar"]
    return {
        "parameters": held["param"],
        "optimizer_state": held["zeros"] + held["scalar"],
        "peak": state + runtime.peak_live_bytes,
    }


def worker(name: str, scratch: Path, rank: int, port: int) -> None:
    """Runs contender `name`'s compiled program as `rank` on every batch (the first `warmup`
    untimed) and writes its losses, step times and memory to the scratch folder."""
    from piperc import runtime

    config = join(name, scratch, rank, port)
    batches = torch.load(scratch / "batches.pt", weights_only=True)
    executor = runtime.load(scratch / f"piperc-{name}")
    losses, times = timed_steps(executor.step, batches, config["warmup"])
    sent = sum(v for k, v in executor.runtime.sent_bytes.items() if k.startswith("all_to_all"))
    result = {"losses": losses, "times": times, "peak_rss_mib": peak_rss_mib(), "memory": rank_memory(executor),
              "all_to_all_bytes_per_step": sent / len(batches)}
    (scratch / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    executor.close()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def compile_contender(name: str, model: moe.MoEDecoder, batch, scratch: Path) -> float:
    """Compiles contender `name` for Mesh(dp=4) into scratch/piperc-<name>; returns seconds."""
    strategy = [piperc.data_parallel(axis="dp")]
    if name == "ep":
        strategy.append(piperc.expert_parallel(axis="dp"))
    if name == "masked":
        model = masked(model)
    start = time.perf_counter()
    compiled = piperc.compile(model, batch, mesh=piperc.Mesh(dp=WORLD), strategy=strategy, optimizer=OPTIMIZER,
                              keep_ir=False)
    compiled.save(str(scratch / f"piperc-{name}"))
    return time.perf_counter() - start


def dispatched_bytes(config: dict) -> int:
    """The bytes ep's all-to-alls send off each rank per step, from the shapes: per MoE layer
    (one microbatch), E*C*d float32 per all-to-all, (n-1)/n of it to the other ranks, in four
    all-to-alls (forward dispatch and combine, backward of both)."""
    layer = MoE(config["d_model"], 4 * config["d_model"], config["experts"], TOP_K)
    capacity = layer.capacity(config["batch"] // WORLD * config["seq"])
    per_direction = config["experts"] * capacity * config["d_model"] * FLOAT_BYTES * (WORLD - 1) // WORLD
    return per_direction * 2 * 2 * config["layers"]


def check_config(args: argparse.Namespace) -> None:
    """Exits with a message when the sizes do not fit 4 ranks and 4 heads."""
    if args.d_model % (2 * N_HEADS):
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of {2 * N_HEADS} "
                         f"({N_HEADS} heads of an even rotary size)")
    if args.experts % WORLD or args.experts < TOP_K:
        raise SystemExit(f"--experts {args.experts} must be a multiple of {WORLD} ranks and at least top-{TOP_K}")
    if args.batch % WORLD:
        raise SystemExit(f"--batch {args.batch} must split into {WORLD} replicas")
    if args.layers < 1 or args.seq < 1:
        raise SystemExit("--layers and --seq must be >= 1")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")


def check_losses(results: dict[str, dict]) -> float:
    """Fails when ep's and dense-dp's step-0 losses differ by more than 1e-5 (same model, same
    slices: they must not); returns the gap."""
    ep, dense = results["ep"]["loss0"], results["dense-dp"]["loss0"]
    gap = abs(ep - dense)
    if gap > LOSS_TOLERANCE:
        raise SystemExit(f"step-0 losses of ep ({ep!r}) and dense-dp ({dense!r}) differ by {gap:.2e}, above "
                         f"{LOSS_TOLERANCE:g}: they do not train the same model on the same slices")
    return gap


def main(argv: list[str] | None = None) -> int:
    """Runs the three contenders and prints the table; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4, help="MoE blocks")
    ap.add_argument("--experts", type=int, default=8, help="experts per MoE layer (multiple of 4)")
    ap.add_argument("--batch", type=int, default=32, help="global batch (rows)")
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    check_config(args)
    config = {"steps": args.steps, "warmup": args.warmup, "d_model": args.d_model, "layers": args.layers,
              "experts": args.experts, "batch": args.batch, "seq": args.seq}
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *argv])

    model = new_model(config)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(w.numel() for m in model.modules() if isinstance(m, MoE) for w in (m.w1, m.w2, m.w3))
    torch.manual_seed(1)
    batches = [gpt.sample_batch(VOCAB, args.seq, args.batch) for _ in range(args.warmup + args.steps)]
    tokens = args.batch // WORLD * args.seq
    capacity = model.blocks[0].moe.capacity(tokens)
    print(f"MoE decoder: {args.layers} blocks, d_model={args.d_model}, {N_HEADS} heads, seq={args.seq}, "
          f"vocab={VOCAB}, {args.experts} SwiGLU experts (hidden {4 * args.d_model}) per block, top-{TOP_K}, "
          f"{params / 1e6:.2f}M parameters ({expert_params / 1e6:.2f}M in experts); global batch {args.batch}; "
          f"AdamW lr={OPTIMIZER.lr} weight_decay={OPTIMIZER.weight_decay}")
    print(f"{WORLD} ranks, Mesh(dp={WORLD}) (gloo, 1 thread each) on {machine()}; per rank and MoE call "
          f"{tokens} tokens, capacity C={capacity}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per contender; "
          f"load average before: {load_average()}", flush=True)

    ranks = run_pairs({name: (name,) for name in CONTENDERS}, config, model, batches,
                      lambda name, scratch: compile_contender(name, model, batches[0], scratch), target=worker)
    results = {name: summarize(r) for name, r in ranks.items()}
    memory = {name: {item: max(r["memory"][item] for r in ranks[name]) for item in MEMORY_ITEMS}
              for name in CONTENDERS}
    gap = check_losses(results)

    label = max(len(label) for label in LABELS.values())
    print()
    print(f"{'contender':<{label}} {'median s':>9} {'x ep':>6} {'params MiB':>11} {'x ep':>6} {'optim MiB':>10} "
          f"{'x ep':>6} {'peak MiB':>9} {'x ep':>6} {'loss@0':>9} {'loss@last':>9}")
    for name in CONTENDERS:
        r, m, base = results[name], memory[name], memory["ep"]
        step = f"{r['median']:>9.4f} {r['median'] / results['ep']['median']:>6.2f}"
        sizes = " ".join(f"{m[item] / MIB:>{width}.3f} {m[item] / base[item]:>6.2f}"
                         for item, width in zip(MEMORY_ITEMS, (11, 10, 9), strict=True))
        print(f"{LABELS[name]:<{label}} {step} {sizes} {r['loss0']:>9.6f} {r['loss_last']:>9.6f}")
    print("(step: median over timed steps of the slowest rank; memory: the largest rank's, by piperc's runtime "
          "count; x ep: over ep's)")
    print()
    sent = dispatched_bytes(config)
    measured = max(r["all_to_all_bytes_per_step"] for r in ranks["ep"])
    print(f"ep dispatch: {sent / MIB:.3f} MiB per step per rank leaving the rank, predicted from the shapes "
          f"({args.layers} MoE layers x 4 all-to-alls x E*C*d*4 B = {args.experts}*{capacity}*{args.d_model}*4 B "
          f"x ({WORLD}-1)/{WORLD}); measured by the runtime: {measured / MIB:.3f} MiB (the largest rank's)")
    print(f"ep vs dense-dp step-0 losses agree to {gap:.1e} (the masked form keeps every token, so its "
          "losses differ)")
    for name in ("dense-dp", "masked"):
        print(f"{name} ratio over ep: {results[name]['median'] / results['ep']['median']:.3f} by median step, "
              f"{memory[name]['peak'] / memory['ep']['peak']:.3f} by peak memory per rank, "
              f"{memory[name]['parameters'] / memory['ep']['parameters']:.3f} by parameters per rank "
              "(above 1 = ep faster / smaller)")
    print_footer(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
