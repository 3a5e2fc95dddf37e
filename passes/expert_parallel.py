"""expert-parallel: routes each mixture-of-experts layer's tokens to the rank that holds their expert.

    expert-parallel{axis=dp region=moe}

A layer is found by the routing contract `piperc.nn.MoE` documents: its forward runs in the
annotated region `region` (ops' `#par.origin<path, F, region "moe">`, the layer's module
path naming it), one `aten.topk` over `[T, E]` router probabilities, a zero `[E*C, d]`
buffer filled by one `aten.scatter_add` along dimension 0 and viewed as the dispatched
buffer `[E, C, d]`, the experts' `[E, ...]` parameters read in the forward only by
`aten.bmm`, and the expert output viewed back to `[E*C, d]` and read by one `aten.gather`
along dimension 0 with the scatter_add's slot indices (the combine).

The pass runs on the captured `@main` (forward and backward together), whose types under
data parallelism are each rank's: one replica's microbatch. In layout terms, the dispatched
buffer of all ranks together is a global `[E, n*C, d]` (n = the axis size), each rank's C
capacity slots a block of dimension 1: the rank holds

    tokens sharded by data rank    #par.sharding<[[], ["dp"], []]>   local [E, C, d]

and the experts need

    experts sharded by expert rank #par.sharding<[["dp"], [], []]>   local [E/n, n*C, d]

so the pass writes that change of layout as a `par.reshard` after the view that makes the
dispatched buffer, and the reverse reshard before the view that flattens the expert output.
lower-reshard turns each into one `par.all_to_all` (split the expert dimension, concatenate
the capacity dimension, and back): the existing layout machinery, no collective written by
hand. Rank r then holds experts r*E/n .. (r+1)*E/n - 1: the layer's `[E, ...]` parameters
become `[E/n, ...]` arguments laid out `[["dp"], [], []]` (so does their optimizer state, and
the runtime cuts each rank's experts from the whole tensor by that layout), and every value
computed between the two reshards from the buffer and those parameters (the bmm's and the
elementwise ops between them) gets its local type `[E/n, n*C, ...]` and that layout
(`par.layouts`). The backward mirrors it: the gradient of the expert output, viewed
`[E, C, d]` by the captured backward, is resharded forward-wise to the experts, and the
gradient of the dispatched buffer back to its tokens' rank before it is flattened. Those views
are found by data flow from the dispatch and the expert parameters, not by their shapes (a
model's `[batch, seq, d]` tokens can have the buffer's shape). Each
expert's gradient is computed, on the one rank holding it, from every rank's tokens routed
to it: it is whole (laid out `[["dp"], [], []]`, no pending sum), so data-parallel does not
all-reduce it; dense gradients are pending sums over the axis, as without experts.

    %buf = "torch.aten.scatter_add"(%zeros, %c0, %slots, %rows) : ... -> !torch.vtensor<[12,8],f32>
    %dispatched = "torch.aten.view"(%buf, %sizes) : ... -> !torch.vtensor<[4,3,8],f32>
    %local = par.reshard %dispatched @mesh from #par.sharding<[[], ["dp"], []]>
               to #par.sharding<[["dp"], [], []]> : !torch.vtensor<[4,3,8],f32> -> !torch.vtensor<[2,6,8],f32>
    %h = "torch.aten.bmm"(%local, %w1) {par.layouts = [#par.sharding<[["dp"], [], []]>]}
           : (!torch.vtensor<[2,6,8],f32>, !torch.vtensor<[2,8,16],f32>) -> !torch.vtensor<[2,6,16],f32>

Buffers stay padded to capacity (static shapes, equal all_to_all splits): every rank sends
E*C*d values per layer and direction, whatever the routing. Capacity is per captured call,
i.e. per (microbatch, data rank) slice, as in GShard; tokens drop as they do on one device
running the same slices.

A layer that breaks the contract (no topk, no dispatch of that shape, an expert parameter
read by something other than bmm in the forward, an op between dispatch and combine that is
not a bmm, transpose or elementwise op, a number of experts that does not divide over the
axis) is a StrategyError naming the directive, the layer's module path and what does not
match.

Options: axis (the mesh axis the experts are sharded over, default dp), region (the
annotated region that marks the layers, default moe), directive (quoted in errors).
Requires: the mesh pass; runs on the captured `@main`, before it is split into stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, ModuleOp
from xdsl.ir import BlockArgument, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.rewriter import Rewriter

from piperc.dialects.par import (
    LAYOUT,
    MeshAttr,
    OriginAttr,
    PassKind,
    ReshardOp,
    ShardingAttr,
    global_shape,
)
from piperc.dialects.roles import ORIGIN, RES_GRAD, main_function, parameter_names
from piperc.dialects.torch import AtenOp, ValueTensorType
from piperc.errors import StrategyError
from piperc.passes.mesh import MESH_SYMBOL, find_axis
from piperc.passes.propagate_sharding import LAYOUTS, value_layout, where
from piperc.passes.sharding_rules import VIEW_OPS, const_int


def _origin(op: Operation) -> OriginAttr | None:
    origin = op.attributes.get(ORIGIN)
    return origin if isinstance(origin, OriginAttr) else None


def _shape(value: SSAValue) -> tuple[int, ...]:
    return value.type.get_shape() if isinstance(value.type, ValueTensorType) else ()


def _within(path: str, layer: str) -> bool:
    """Whether module `path` is the layer's module or one of its submodules (its router)."""
    return path == layer or path.startswith(layer + ".")


@dataclass
class _Layer:
    """One MoE layer of `@main`, read by the contract: its sizes, its dispatch and its experts."""

    path: str
    ops: list[Operation]
    """The layer's forward ops (its region, its module path), in order."""
    directive: str
    mesh: MeshAttr
    experts: int = 0
    capacity: int = 0
    width: int = 0
    dispatch: Operation | None = None
    """The forward view `[E*C, d]` -> `[E, C, d]` of the scatter_add buffer."""
    params: list[BlockArgument] = field(default_factory=list)

    def fail(self, what: str) -> StrategyError:
        return StrategyError(f"{self.directive}: MoE layer '{self.path}': {what}; see piperc.nn.MoE's contract")

    def read(self, main: func.FuncOp) -> None:
        """Finds the layer's sizes, its dispatch view and its expert parameters, by the contract."""
        topk = [op for op in self.ops if op.name == "torch.aten.topk"]
        if len(topk) != 1:
            raise self.fail(f"its forward has {len(topk)} aten.topk ops; the router picks each token's experts "
                            "with exactly one")
        probs, chosen = self.global_shape(topk[0].operands[0]), self.global_shape(topk[0].results[1])
        if len(probs) != 2 or const_int(topk[0].operands[2]) not in (1, -1):
            raise self.fail(f"aten.topk reads {topk[0].operands[0].type} along dimension "
                            f"{const_int(topk[0].operands[2])}; the router's probabilities are [T, E], topk "
                            "picks along E")
        self.experts, tokens, k = probs[1], probs[0], chosen[1]
        scatters = [op for op in self.ops if op.name == "torch.aten.scatter_add"]
        if len(scatters) != 1:
            raise self.fail(f"its forward has {len(scatters)} aten.scatter_add ops; the dispatch fills the "
                            "[E*C, d] buffer with exactly one")
        scatter = scatters[0]
        buffer, rows = _shape(scatter.results[0]), _shape(scatter.operands[3])
        if (len(buffer) != 2 or const_int(scatter.operands[1]) != 0 or buffer[0] % self.experts
                or rows != (k * tokens, buffer[1])):
            raise self.fail(f"aten.scatter_add makes {scatter.results[0].type} from {scatter.operands[3].type} "
                            f"along dimension {const_int(scatter.operands[1])}; the dispatch scatters the "
                            f"[k*T, d] = [{k * tokens}, d] token rows along dimension 0 into an [E*C, d] buffer "
                            f"(E = {self.experts})")
        self.capacity, self.width = buffer[0] // self.experts, buffer[1]
        views = [u.operation for u in scatter.results[0].uses]
        if len(views) != 1 or not self.is_dispatch_view(views[0]):
            raise self.fail(f"the dispatch buffer {scatter.results[0].type} is read by "
                            f"{', '.join(sorted(v.name for v in views))}; the contract views it, and only that, "
                            f"as [E, C, d] = [{self.experts}, {self.capacity}, {self.width}]")
        self.dispatch = views[0]
        self.check_whole(self.dispatch.results[0], "the dispatched buffer")
        self.read_experts(main)
        self.check_combine(scatter.operands[2])

    def global_shape(self, value: SSAValue) -> tuple[int, ...]:
        """The shape of `value` over the whole mesh: its per-device shape times the parts its
        layout splits each dimension into (tensor parallelism may split the router's tokens)."""
        return tuple(global_shape(_shape(value), value_layout(value), self.mesh))

    def check_whole(self, value: SSAValue, what: str) -> None:
        """The experts' part is computed whole on each device: `value` is split over no axis
        and is no pending sum (tensor parallelism shards the dense part only)."""
        layout = value_layout(value)
        if any(layout.dim_axes(d) for d in range(layout.rank())) or layout.partial_axes():
            raise self.fail(f"{what} {value.type} is laid out {layout} by the strategies before expert "
                            "parallelism; the experts' part runs on whole tensors (leave the layer's "
                            "parameters out of a tensor-parallel plan)")

    def is_dispatch_view(self, op: Operation) -> bool:
        """A view from `[E*C, d]` to `[E, C, d]` (the dispatched buffer, or its gradient)."""
        return (op.name in VIEW_OPS and _shape(op.operands[0]) == (self.experts * self.capacity, self.width)
                and _shape(op.results[0]) == self.buffer_shape)

    def is_combine_view(self, op: Operation) -> bool:
        """A view from `[E, C, d]` to `[E*C, d]` (the expert output, or the dispatched buffer's gradient)."""
        return (op.name in VIEW_OPS and _shape(op.operands[0]) == self.buffer_shape
                and _shape(op.results[0]) == (self.experts * self.capacity, self.width))

    @property
    def buffer_shape(self) -> tuple[int, int, int]:
        return self.experts, self.capacity, self.width

    def read_experts(self, main: func.FuncOp) -> None:
        """The expert parameters: the `[E, ...]` parameters of rank 3 the layer's forward reads,
        each only as a bmm's weight."""
        names = [parameter_names(a) for a in main.arg_attrs.data]
        ours = set(self.ops)
        for arg in main.args:
            shape = _shape(arg)
            if not names[arg.index] or len(shape) != 3 or shape[0] != self.experts:
                continue
            if not any(u.operation in ours for u in arg.uses):
                continue
            for op in (u.operation for u in arg.uses):
                origin = _origin(op)
                if origin is not None and origin.pass_kind == PassKind.B:
                    continue
                if op not in ours or op.name != "torch.aten.bmm" or op.operands[1] is not arg:
                    raise self.fail(f"expert parameter '{names[arg.index][0]}' {arg.type} is read by "
                                    f"{where(op)}; in the forward the contract reads each expert parameter only "
                                    "as the weight of an aten.bmm whose batch dimension is the expert")
            self.check_whole(arg, f"expert parameter '{names[arg.index][0]}'")
            self.params.append(arg)
        if not self.params:
            raise self.fail(f"its forward reads no [E, ...] = [{self.experts}, ...] parameter of rank 3 with a bmm; "
                            "the experts' weights are stacked along the expert dimension")

    def check_combine(self, slots: SSAValue) -> None:
        """The forward's combine: one aten.gather along dimension 0 with the dispatch's slot
        indices, reading the expert output viewed `[E*C, d]`, which nothing else reads."""
        gathers = [op for op in self.ops if op.name == "torch.aten.gather" and op.operands[2] is slots]
        if len(gathers) != 1:
            raise self.fail(f"its forward reads {len(gathers)} tensors with aten.gather by the dispatch's slot "
                            "indices; the combine gathers the expert output so, once")
        gather, flat = gathers[0], gathers[0].operands[0]
        view = flat.owner
        if const_int(gather.operands[1]) != 0 or not isinstance(view, Operation) or not self.is_combine_view(view):
            raise self.fail(f"the combine's aten.gather reads {flat.type} along dimension "
                            f"{const_int(gather.operands[1])}; it gathers along dimension 0 the expert output "
                            f"[E, C, d] = {list(self.buffer_shape)} viewed [E*C, d]")
        readers = [u.operation for u in flat.uses]
        if readers != [gather]:
            raise self.fail(f"the expert output is read by {', '.join(where(op) for op in readers)}; the combine "
                            "reads it only with one aten.gather")


@dataclass
class _Rewrite:
    """The expert-parallel rewrite of one layer in `@main`."""

    layer: _Layer
    main: func.FuncOp
    axis: str
    size: int
    local: set[SSAValue] = field(default_factory=set)
    """The values laid out by expert: each rank holds its experts' part."""

    @property
    def tokens(self) -> ShardingAttr:
        """The dispatched buffer as each data rank holds it: its own capacity slots of every expert."""
        return ShardingAttr([[], [self.axis], []])

    @property
    def by_expert(self) -> ShardingAttr:
        """An `[E, ...]` value as the expert ranks hold it: each its E/n experts, whole."""
        return ShardingAttr([[self.axis], [], []])

    def run(self) -> None:
        layer = self.layer
        for view in self.entries():
            self.to_experts(view)
        for param in layer.params:
            self.shard_parameter(param)
        for op in list(self.main.body.block.ops):
            if isinstance(op, ReshardOp) or not any(v in self.local for v in op.operands):
                continue
            self.localise(op)
        self.main.update_function_type()

    def entries(self) -> list[Operation]:
        """The views to `[E, C, d]` the experts' part reads: the dispatch, and the ones that part
        reads besides (in the backward, the expert output's gradient), found by data flow from
        the dispatch and the expert parameters (a view's shapes alone can be a model's
        `[batch, seq, d]` tokens)."""
        entries = [self.layer.dispatch]
        while True:
            reached = set(self.layer.params) | {v.results[0] for v in entries}
            new = []
            for op in self.main.body.block.ops:
                if isinstance(op, func.ReturnOp) or not any(v in reached for v in op.operands):
                    continue
                if op.name in VIEW_OPS and _shape(op.results[0]) == (self.layer.experts * self.layer.capacity,
                                                                   self.layer.width):
                    continue
                reached.update(op.results)
                new += [v.owner for v in op.operands if v not in reached and isinstance(v.owner, Operation)
                        and self.layer.is_dispatch_view(v.owner) and v.owner not in entries + new]
            if not new:
                return entries
            entries += new

    def to_experts(self, view: Operation) -> None:
        """After a view to `[E, C, d]`, the reshard from the tokens' rank to the experts' rank."""
        e, c, d = self.layer.buffer_shape
        local = ValueTensorType([e // self.size, c * self.size, d], view.results[0].type.dtype)
        reshard = ReshardOp(view.results[0], MESH_SYMBOL, self.tokens, self.by_expert, local)
        reshard.attributes[ORIGIN] = view.attributes[ORIGIN]
        view.parent_block().insert_op_after(reshard, view)
        view.results[0].replace_all_uses_with(reshard.result)
        reshard.operands[0] = view.results[0]
        self.local.add(reshard.result)

    def shard_parameter(self, param: BlockArgument) -> None:
        """An expert parameter becomes this rank's experts, laid out by expert."""
        shape = list(_shape(param))
        shape[0] //= self.size
        new = Rewriter.replace_value_with_new_type(param, ValueTensorType(shape, param.type.dtype))
        attrs = list(self.main.arg_attrs.data)
        attrs[new.index] = DictionaryAttr({**attrs[new.index].data, LAYOUT: self.by_expert})
        self.main.arg_attrs = ArrayAttr(attrs)
        self.local.add(new)

    def localise(self, op: Operation) -> None:
        """Gives an op that reads expert-local values its local result types, or ends the
        experts' part at a view back to `[E*C, d]` or at an expert gradient the step returns."""
        if self.is_local_combine_view(op):
            self.to_tokens(op)
            return
        if isinstance(op, func.ReturnOp):
            self.expert_gradients(op)
            return
        shape = self.local_shape(op)
        for r in list(op.results):
            if isinstance(r.type, ValueTensorType):
                self.local.add(Rewriter.replace_value_with_new_type(r, ValueTensorType(shape, r.type.dtype)))
        op.attributes[LAYOUTS] = ArrayAttr(
            [self.by_expert for r in op.results if isinstance(r.type, ValueTensorType)])

    def local_shape(self, op: Operation) -> list[int]:
        """The local result shape of a bmm, a transpose within an expert or an elementwise op."""
        operands = [v for v in op.operands if isinstance(v.type, ValueTensorType)]
        if op.name == "torch.aten.bmm" and all(v in self.local for v in operands):
            (b, m, _), (_, _, p) = (_shape(v) for v in operands)
            return [b, m, p]
        if op.name == "torch.aten.transpose.int":
            shape = list(_shape(op.operands[0]))
            dims = [const_int(op.operands[1]), const_int(op.operands[2])]
            if None not in dims and all(d % len(shape) > 0 for d in dims):  # the expert dimension stays first
                a, b = (d % len(shape) for d in dims)
                shape[a], shape[b] = shape[b], shape[a]
                return shape
        elif (isinstance(op, AtenOp) and torch.Tag.pointwise in op.aten.tags
              and all(v in self.local or not _shape(v) for v in operands)):
            shapes = {_shape(v) for v in operands if v in self.local}
            if len(shapes) == 1:
                return list(shapes.pop())
        raise self.layer.fail(
            f"{where(op)} reads the experts' part ({', '.join(str(v.type) for v in operands)}); between the "
            "dispatch and the combine the contract allows aten.bmm on the dispatched buffer and the expert "
            "parameters, elementwise ops, and in the backward the transposes of bmm's operands")

    def is_local_combine_view(self, op: Operation) -> bool:
        """A view of this rank's experts' `[E/n, n*C, d]` to `[E*C, d]`: the expert output, or the
        dispatched buffer's gradient, going back to its tokens."""
        e, c, d = self.layer.buffer_shape
        return (op.name in VIEW_OPS and _shape(op.operands[0]) == (e // self.size, c * self.size, d)
                and _shape(op.results[0]) == (e * c, d))

    def to_tokens(self, view: Operation) -> None:
        """Before a view back to `[E*C, d]`, the reshard from the experts' rank to the tokens' rank."""
        value = view.operands[0]
        whole = ValueTensorType(list(self.layer.buffer_shape), value.type.dtype)
        reshard = ReshardOp(value, MESH_SYMBOL, self.by_expert, self.tokens, whole)
        reshard.attributes[ORIGIN] = view.attributes[ORIGIN]
        view.parent_block().insert_op_before(reshard, view)
        view.operands[0] = reshard.result

    def expert_gradients(self, ret: func.ReturnOp) -> None:
        """The step returns each expert parameter's gradient laid out by expert; nothing else of
        the experts' part may leave the layer."""
        params = {parameter_names(self.main.arg_attrs.data[p.index])[0] for p in self.layer.params}
        attrs = list(self.main.res_attrs.data)
        for i, v in enumerate(ret.operands):
            if v not in self.local:
                continue
            grad = attrs[i].data.get(RES_GRAD)
            if grad is None or grad.data not in params:
                raise self.layer.fail(f"result {i} of the step is computed by the experts ({v.type}); only the "
                                      "expert parameters' gradients leave the experts' part other than through "
                                      "the combine")
            attrs[i] = DictionaryAttr({**attrs[i].data, LAYOUT: self.by_expert})
        self.main.res_attrs = ArrayAttr(attrs)


def _forward_ops(main: func.FuncOp, region: str) -> list[Operation]:
    """The forward ops of `@main` in the annotated region `region`, in order."""
    return [op for op in main.body.block.ops
            if (o := _origin(op)) is not None and o.region == region and o.pass_kind == PassKind.F]


def router_paths(main: func.FuncOp, region: str) -> list[str]:
    """The module paths of the forward `aten.topk` ops in `region`: one per MoE layer that
    routes (what `find_layers` reads first, and `Compiled.moe_layers` counts)."""
    return list(dict.fromkeys(_origin(op).path for op in _forward_ops(main, region) if op.name == "torch.aten.topk"))


def find_layers(main: func.FuncOp, region: str, directive: str, mesh: MeshAttr) -> list[_Layer]:
    """The MoE layers of `@main`: per module path of a forward `aten.topk` in `region`, the
    forward ops of that region within the path. The forward ops of the region outside every such
    path make layers of their own, named by their outermost module (which then fail the contract
    for want of a topk)."""
    ops = _forward_ops(main, region)
    paths = router_paths(main, region)
    for path in sorted({_origin(op).path for op in ops}, key=len):
        if not any(_within(path, p) for p in paths):
            paths.append(path)
    return [_Layer(p, [op for op in ops if _within(_origin(op).path, p)], directive, mesh) for p in paths]


@dataclass(frozen=True)
class ExpertParallelPass(ModulePass):
    """Shards each MoE layer's experts over `axis` and routes its dispatched tokens to them and
    back by reshards of the dispatched buffer (see the module docstring)."""

    name = "expert-parallel"

    axis: str = "dp"
    region: str = "moe"
    directive: str = "expert-parallel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = find_axis(op, self.axis, self.directive)
        size = mesh.axis_size(self.axis)
        main = main_function(op)
        layers = find_layers(main, self.region, self.directive, mesh)
        if not layers:
            raise StrategyError(f"{self.directive}: the model has no MoE layer: no op of its forward runs in the "
                                f"annotated region '{self.region}' (piperc.nn.MoE, or a module whose forward runs "
                                f"inside piperc.annotate('{self.region}'))")
        for layer in layers:
            layer.read(main)
            if layer.experts % size:
                raise layer.fail(f"its {layer.experts} experts do not divide over the {size} ranks of axis "
                                 f"'{self.axis}'; use a number of experts that is a multiple of {size}")
            _Rewrite(layer, main, self.axis, size).run()
