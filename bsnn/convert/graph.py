"""Graph capture for conversion: torch.fx tracing and normalisation.

:func:`capture` returns a ``GraphModule`` in which

* every activation is its own ``nn.ReLU`` call (functional ``F.relu`` / ``torch.relu`` / ``x.relu()``,
  inplace variants and re-used ReLU modules are all given a module of their own — never silently skipped),
* every clipped activation ``min(max(x, 0), a)`` is its own ``nn.Hardtanh(0, a)`` call (``nn.ReLU6``, ``F.relu6``,
  ``F.hardtanh(x, 0, a)``, ``torch.clamp(x, 0, a)`` / ``x.clamp(0, a)`` / ``torch.clip``; ``clamp(x, min=0)`` alone is
  a ReLU): the IF neuron realises the clip, its threshold being at most ``a``; other lower bounds are refused,
* ``torch.cat`` joins values along the channels (dim 1) only; other dims are refused with the node's name,
* every max-pool (``F.max_pool2d``, ``torch.max_pool2d``, ``F.adaptive_max_pool2d`` included) is its own
  ``nn.MaxPool2d`` / ``nn.AdaptiveMaxPool2d`` module, placed beside its neighbouring activation as the
  ``convert.maxpool`` strategy asks (:mod:`bsnn.convert.maxpool`; max commutes with monotone activations), or
  replaced by an average pool (``avg``),
* dropout is removed (identity at inference),
* every node has its output shape in ``node.meta['shape']`` (from one sample),
* dim 0 is the batch everywhere (checked on two samples) and every ``view`` / ``reshape`` is batch-size free
  (``x.size(0)``-style sizes are replaced by ``-1``): the simulator folds time into the batch,
* anything the converter does not support raises :class:`ConversionError` naming the op and its place.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from bsnn.activations import ClipReLU, QCFS
from bsnn.binary import BinaryConv2d, BinaryLinear
from bsnn.convert.maxpool import MAXPOOL_MODULES, MAXPOOL_STRATEGIES, MaxPoolStrategy, average_pool_like
from bsnn.errors import ConversionError
from bsnn.snn.network import is_pass_through
from bsnn.snn.synapse import replace_submodule

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_}
RELU_METHODS = {"relu", "relu_"}
CLIP_FUNCTIONS = {F.relu6, F.hardtanh, F.hardtanh_, torch.clamp, torch.clamp_, torch.clip, torch.clip_}
CLIP_METHODS = {"clamp", "clamp_", "clip", "clip_"}
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}
ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
SHAPE_FUNCTIONS = {torch.flatten}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
POOL_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d, torch.nn.functional.avg_pool2d}
SHAPE_METHODS = {"view", "reshape", "flatten", "size", "contiguous"}
#: functional max-pools -> (module, its arguments after the input, in order)
MAXPOOL_FUNCTIONS = {F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                                   "return_indices")),
                     torch.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
                     F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, ("output_size", "return_indices"))}

SYNAPTIC = (nn.Conv2d, nn.Linear)
ACTIVATION_MODULES = (nn.ReLU, nn.Hardtanh, ClipReLU, QCFS)  # nn.ReLU6 is a Hardtanh(0, 6)
LINEAR_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


#: every module type capture accepts (activations, pools and shape modules are normalised to these)
SUPPORTED_MODULES = (*SYNAPTIC, nn.BatchNorm1d, nn.BatchNorm2d, *ACTIVATION_MODULES, nn.ReLU6, *LINEAR_MODULES,
                     *MAXPOOL_MODULES, nn.Dropout)


def _op_name(op) -> str:
    module = getattr(op, "__module__", None) or ""
    prefix = {"torch.nn.functional": "F.", "_operator": "operator.", "operator": "operator."}.get(module, "torch.")
    return prefix + getattr(op, "__name__", str(op))


def supported_operations() -> dict[str, list[str]]:
    """What capture accepts, by kind (``modules``, ``functions``, ``methods``): the lists the converter checks
    against, so the documentation generated from them (:func:`supported_operations_markdown`) cannot drift."""
    functions = RELU_FUNCTIONS | CLIP_FUNCTIONS | set(MAXPOOL_FUNCTIONS) | DROPOUT_FUNCTIONS | ADD_FUNCTIONS | \
        SHAPE_FUNCTIONS | CAT_FUNCTIONS | POOL_FUNCTIONS
    return {"modules": sorted({m.__name__ for m in SUPPORTED_MODULES}),
            "functions": sorted({_op_name(f) for f in functions}),
            "methods": sorted(f"Tensor.{m}" for m in SHAPE_METHODS | RELU_METHODS | CLIP_METHODS)}


def supported_operations_markdown() -> str:
    """The supported-operation lists as markdown (``docs/conversion.md`` embeds it; ``bsnn convert --list-ops``
    prints it)."""
    ops = supported_operations()
    return "\n".join(f"* **{kind}**: " + ", ".join(f"`{n}`" for n in names) for kind, names in ops.items())


def _inherits_torch_layer(m: nn.Module) -> bool:
    """A layer without children whose ``forward`` is a ``torch.nn`` layer's (a subclass that only changes its
    initialisation or its frozen parameters, e.g. airbench's BatchNorm): a leaf, like the layer it extends."""
    return not any(True for _ in m.children()) and type(m).forward.__module__.startswith("torch.nn.modules")


class _Tracer(fx.Tracer):
    """fx tracer that keeps bsnn's binary layers, and subclasses of torch layers that keep their forward, as
    leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (BinaryConv2d, BinaryLinear, ClipReLU, QCFS)) or _inherits_torch_layer(m) or \
            super().is_leaf_module(m, qualname)


def where(node: fx.Node) -> str:
    """Human-readable location of ``node``: the module path or function, its graph node and its inputs."""
    ins = ", ".join(a.name for a in node.all_input_nodes) or "-"
    if node.op == "call_module":
        what = f"module '{node.target}'"
    else:
        what = f"{node.op.replace('call_', '')} {getattr(node.target, '__name__', node.target)}"
    return f"{what} (graph node '{node.name}', inputs: {ins})"


def capture(model: nn.Module, example: torch.Tensor, maxpool: str = "spiking") -> fx.GraphModule:
    """Trace and normalise ``model`` (a deep copy; the original is not touched).

    Args:
        model: the ANN.
        example: one input batch ``[B, C, H, W]`` used to record shapes.
        maxpool: the ``convert.maxpool`` strategy (:data:`~bsnn.convert.maxpool.MAXPOOL_STRATEGIES`): where
            max-pools go relative to their activations, or ``avg`` to replace them.

    Raises:
        ConversionError: untraceable code (with the tracer's reason) or an unsupported op.
    """
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types; re-raise as one clear error
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. Conversion needs a "
            "forward without data-dependent Python control flow; move such logic out of forward() "
            "or wrap it in a leaf module"
        ) from None
    gm = fx.GraphModule(model, graph)
    strategy = MAXPOOL_STRATEGIES.get(maxpool)
    _normalise(gm)
    _place_maxpools(gm, strategy)
    _check_batchnorm(gm)
    one = _ShapeRecorder(gm).shapes_on(example[:1], type(model).__name__)
    for node in gm.graph.nodes:
        node.meta["shape"] = one[node]
    _ShapeRecorder(gm, one).shapes_on(torch.cat([example[:1]] * 2), type(model).__name__)
    _batch_free_reshapes(gm, one)
    _check_supported(gm)
    return gm


BATCH_HINT = ("the simulator folds time into the batch ([T*B, ...]), so every tensor must keep dim 0 as the batch: "
              "flatten with h.flatten(1) or h.view(h.size(0), -1)")


class _ShapeRecorder(fx.Interpreter):
    """Runs a captured graph once, recording every node's output shape (``None`` for non-tensor values).

    With ``one`` (the shapes for one sample) the run is on two samples and each tensor computed from the input is
    checked to keep dim 0 as the batch — ``(2, *shape[1:])`` where one sample gave ``(1, *shape[1:])`` — so an op
    that mixes the batch into other dims is named before anything downstream fails on it.
    """

    def __init__(self, gm: fx.GraphModule, one: dict[fx.Node, tuple | None] | None = None) -> None:
        super().__init__(gm)
        self.one = one
        self.shapes: dict[fx.Node, tuple | None] = {}
        self.batched: set[fx.Node] = set()  # nodes computed from the input

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.shapes[n] = shape
        if n.op == "placeholder" or any(a in self.batched for a in n.all_input_nodes):
            self.batched.add(n)
        ref = self.one[n] if self.one is not None else None
        if ref is not None and n in self.batched and not (ref[:1] == (1,) and shape == (2, *ref[1:])):
            raise ConversionError(f"{where(n)} does not keep dim 0 as the batch (output shape {ref} for one "
                                  f"sample, {shape} for two); {BATCH_HINT}")
        return out

    @torch.no_grad()
    def shapes_on(self, x: torch.Tensor, model_name: str) -> dict[fx.Node, tuple | None]:
        try:
            self.run(x)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{model_name} fails on a calibration sample of shape {tuple(x.shape[1:])}: "
                                  f"{str(e).splitlines()[0]}") from None
        return self.shapes


def _batch_free_reshapes(gm: fx.GraphModule, one: dict[fx.Node, tuple | None]) -> None:
    """Make reshapes independent of the batch size (call after the batch check of :class:`_ShapeRecorder`).

    ``one``: every node's shape for one sample. A ``view`` / ``reshape`` of a batched tensor becomes
    ``reshape(-1, *shape[1:])`` with the per-sample shape it had on the calibration sample, so that sizes read
    from the input (``x.size(0)``, ``x.shape[0]``, ...) no longer matter: inside the simulator the batch holds
    T·B rows, not B (``reshape``, not ``view``: the simulator runs channels-last). The size computations left
    without users are removed.
    """
    graph = gm.graph
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if node.op == "call_method" and node.target in ("view", "reshape") and one[node] is not None \
                and isinstance(src, fx.Node) and src.op != "get_attr" and one[node][:1] == (1,):
            node.target, node.args, node.kwargs = "reshape", (src, -1, *one[node][1:]), {}
    changed = True
    while changed:  # the size arithmetic that only fed reshapes (size, getattr shape, getitem, mul, ...)
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_method", "call_function") and not node.users and one[node] is None:
                graph.erase_node(node)
                changed = True
    graph.lint()
    gm.recompile()


def _clip_bounds(node: fx.Node) -> tuple:
    """``(input, lower, upper)`` of a functional / method clip (relu6, hardtanh, clamp, clip)."""
    args, kw = list(node.args), node.kwargs
    if node.target is F.relu6:
        return args[0], 0.0, 6.0
    if node.target in (F.hardtanh, F.hardtanh_):
        names, defaults = ("min_val", "max_val"), (-1.0, 1.0)
    else:
        names, defaults = ("min", "max"), (None, None)
    bounds = [args[1 + i] if len(args) > 1 + i else kw.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    return args[0], *bounds


def _clip_module(node: fx.Node) -> nn.Module:
    """The module replacing a functional clip: ``nn.ReLU`` for ``clamp(x, min=0)``, else ``nn.Hardtanh(0, a)``.

    Raises:
        ConversionError: a lower bound other than 0, an upper bound <= 0, or bounds that are not numbers.
    """
    _, lo, hi = _clip_bounds(node)
    numbers = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (lo, hi))
    if not numbers or lo is None or float(lo) != 0.0 or (hi is not None and float(hi) <= 0.0):
        raise ConversionError(f"unsupported clip at {where(node)} (lower bound {lo!r}, upper bound {hi!r}): an IF "
                              "neuron realises only min(max(x, 0), a) with number bounds, a > 0; use F.relu, "
                              "F.relu6, F.hardtanh(x, 0, a) or x.clamp(0, a)")
    return nn.ReLU() if hi is None else nn.Hardtanh(0.0, float(hi))


def _maxpool_module(node: fx.Node) -> nn.Module:
    """The module replacing a functional max-pool (``F.max_pool2d``, ``torch.max_pool2d``,
    ``F.adaptive_max_pool2d``) with the same settings.

    Raises:
        ConversionError: ``return_indices=True`` (the indices are no network value), or settings that are not
            constants.
    """
    cls, names = MAXPOOL_FUNCTIONS[node.target]
    given = dict(zip(names, node.args[1:]))
    given.update({k: v for k, v in node.kwargs.items() if k in names})
    if any(isinstance(v, fx.Node) for v in given.values()) or set(node.kwargs) - set(names):
        raise ConversionError(f"max-pool at {where(node)} has settings computed in forward or unknown keywords "
                              f"({sorted(node.kwargs)}); give kernel_size / stride / padding as constants")
    if given.pop("return_indices", False):
        raise ConversionError(f"max-pool at {where(node)} returns its indices; a converted network can use only the "
                              "pooled values: call it with return_indices=False")
    if cls is nn.MaxPool2d and given.get("stride") in (None, [], ()):
        given.pop("stride", None)  # torch.max_pool2d's default stride [] means the kernel size, as in nn.MaxPool2d
    return cls(**given)


def _normalise(gm: fx.GraphModule) -> None:
    graph, used, count = gm.graph, set(), 0
    for node in list(graph.nodes):
        new_module = None
        if node.op == "call_function" and node.target in RELU_FUNCTIONS or \
                node.op == "call_method" and node.target in RELU_METHODS:
            new_module = nn.ReLU()
        elif node.op == "call_function" and node.target in CLIP_FUNCTIONS or \
                node.op == "call_method" and node.target in CLIP_METHODS:
            new_module = _clip_module(node)
        elif node.op == "call_function" and node.target in MAXPOOL_FUNCTIONS:
            new_module = _maxpool_module(node)
        is_mod_act = node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                             (nn.ReLU, nn.Hardtanh, *MAXPOOL_MODULES))
        if new_module is not None or (is_mod_act and node.target in used):
            if new_module is None:  # a re-used module: a copy of its own
                new_module = copy.deepcopy(gm.get_submodule(node.target))
            prefix = "pool" if isinstance(new_module, MAXPOOL_MODULES) else "act"
            name = f"{prefix}_{node.name}" if not is_mod_act else f"{node.target.replace('.', '_')}_{count}"
            count += 1
            gm.add_submodule(name, new_module)
            with graph.inserting_after(node):
                new = graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            used.add(name)
        elif is_mod_act:
            used.add(node.target)
        elif node.op == "call_function" and node.target in CAT_FUNCTIONS:
            _check_cat(node, before_shapes=True)
        elif (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Dropout)) or \
                (node.op == "call_function" and node.target in DROPOUT_FUNCTIONS):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_activation(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and isinstance(_module(gm, node), ACTIVATION_MODULES)


def _place_maxpools(gm: fx.GraphModule, strategy: MaxPoolStrategy) -> None:
    """Put each max-pool module beside its activation as ``strategy`` asks, or replace it by an average pool.

    ``act -> pool`` and ``pool -> act`` compute the same (max commutes with monotone activations); a pool is
    moved only across an activation that feeds only it (or that only it feeds), so nothing else changes.
    """
    graph = gm.graph
    for pool in list(graph.nodes):
        m = _module(gm, pool)
        if not isinstance(m, MAXPOOL_MODULES):
            continue
        if strategy.activation_first is None:  # avg: the ANN itself changes
            replace_submodule(gm, pool.target, average_pool_like(m, where(pool)))
            continue
        src = pool.args[0]
        users = list(pool.users)
        if strategy.activation_first and len(users) == 1 and _is_activation(gm, users[0]) \
                and not _is_activation(gm, src):  # pool -> act  becomes  act -> pool
            _swap(graph, first=pool, second=users[0])
        elif not strategy.activation_first and _is_activation(gm, src) and len(src.users) == 1:
            _swap(graph, first=src, second=pool)  # act -> pool  becomes  pool -> act
    graph.lint()
    gm.recompile()


def _swap(graph: fx.Graph, first: fx.Node, second: fx.Node) -> None:
    """``second(first(x))`` -> ``first(second(x))`` for two single-input modules, ``first`` used only by ``second``."""
    x = first.args[0]
    second.replace_all_uses_with(first)
    first.args = (second, *first.args[1:])
    second.args = (x, *second.args[1:])
    second.append(first)  # keep topological order: first now runs after second


def _check_batchnorm(gm: fx.GraphModule) -> None:
    """BatchNorm must have running statistics to be folded (checked before any forward: without them a BatchNorm
    normalises each batch by its own statistics, and BatchNorm1d fails on one sample)."""
    for node in gm.graph.nodes:
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise ConversionError(
                f"BatchNorm '{node.target}' at {where(node)} has track_running_stats=False: it normalises every batch "
                "by that batch's own statistics, which cannot be folded into the layer before it. Build it with "
                "track_running_stats=True (the default) and retrain, or re-estimate its running statistics")


def _check_supported(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.Hardtanh) and (m.min_val != 0 or m.max_val <= 0):
                raise ConversionError(f"unsupported {type(m).__name__}(min_val={m.min_val}, max_val={m.max_val}) at "
                                      f"{where(node)}: an IF neuron realises only min(max(x, 0), a) with a > 0; use "
                                      "nn.Hardtanh(0, a), nn.ReLU6 or nn.ReLU")
            if isinstance(m, MAXPOOL_MODULES) and m.return_indices:
                raise ConversionError(f"max-pool at {where(node)} returns its indices; a converted network can use "
                                      "only the pooled values: build it with return_indices=False")
            if not isinstance(m, SUPPORTED_MODULES):
                raise ConversionError(f"unsupported module {type(m).__name__} at {where(node)}; supported modules: "
                                      f"{', '.join(supported_operations()['modules'])} (docs/conversion.md)")
        elif node.op == "call_function":
            if node.target in CAT_FUNCTIONS:
                _check_cat(node)
            elif node.target not in ADD_FUNCTIONS | SHAPE_FUNCTIONS | POOL_FUNCTIONS:
                raise ConversionError(f"unsupported function at {where(node)}; supported functions: "
                                      f"{', '.join(supported_operations()['functions'])} (docs/conversion.md)")
        elif node.op == "call_method" and node.target not in SHAPE_METHODS:
            raise ConversionError(f"unsupported method at {where(node)}; supported methods: "
                                  f"{', '.join(supported_operations()['methods'])}")


def cat_inputs(node: fx.Node) -> list:
    """The tensors joined by a ``torch.cat`` node (its first argument, a list or tuple)."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", node.kwargs.get("inputs"))
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def _check_cat(node: fx.Node, before_shapes: bool = False) -> None:
    """A concatenation must join network values of rank >= 2 along the channels (dim 1). ``before_shapes``: only
    what is known before shapes are recorded (the batch dim is refused before the batch check names it)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    shape = node.meta.get("shape")
    rank = len(shape) if shape is not None else 0
    inputs = cat_inputs(node)
    if before_shapes and isinstance(dim, int) and dim != 0:
        return
    if not isinstance(dim, int) or rank < 2 or dim % rank != 1:
        raise ConversionError(f"unsupported concatenation along dim {dim!r} at {where(node)} (output shape {shape}): "
                              "only channels (dim 1) can be joined — dim 0 is the batch (the simulator folds time "
                              "into it) and spatial/feature dims would mix neurons; concatenate with dim=1")
    if not all(isinstance(a, fx.Node) and a.op != "get_attr" and a.meta.get("shape") is not None for a in inputs):
        raise ConversionError(f"concatenation at {where(node)} joins a constant or non-tensor operand; only network "
                              "values computed from the input can be concatenated")


def activation_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The activation modules (ReLU, ClipReLU, QCFS) of a captured graph, in graph order, each used once."""
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ACTIVATION_MODULES)}


def relu_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The ReLU and clipped-ReLU (``nn.Hardtanh(0, a)``, ``nn.ReLU6``) modules of a captured graph, in graph order:
    their thresholds come from calibration (a clip's is at most ``a``, :func:`clip_bounds`)."""
    return {k: m for k, m in activation_modules(gm).items() if isinstance(m, (nn.ReLU, nn.Hardtanh))}


def observed_modules(gm: fx.GraphModule, names: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Where each activation in ``names`` is calibrated: the module itself, or the max-pool it alone feeds.

    A max-pool passes on only the largest activations of each window, so the percentile that sets the
    threshold must be taken over the *pooled* values — over the activation itself it would clip exactly the
    values the pool selects (on a random-init torchvision ResNet-18, clipping its stem at the p99.99 of the
    un-pooled values alone cost 4 % of the logits).
    """
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    out = {}
    for k, m in names.items():
        users = list(nodes[k].users)
        pool = _module(gm, users[0]) if len(users) == 1 else None
        out[k] = pool if isinstance(pool, MAXPOOL_MODULES) else m
    return out


def clip_bounds(gm: fx.GraphModule) -> dict[str, float]:
    """Activation module name -> its upper bound ``a`` for the clipped ReLUs (``nn.Hardtanh(0, a)``, ``nn.ReLU6``)."""
    return {k: float(m.max_val) for k, m in activation_modules(gm).items() if isinstance(m, nn.Hardtanh)}


_PASS_THROUGH = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, *MAXPOOL_MODULES, nn.Flatten, nn.Dropout, nn.Identity)


def per_channel_allowed(gm: fx.GraphModule, names: list[str] | set[str]) -> set[str]:
    """The activations among ``names`` whose spikes may carry a per-channel scale: every path from them, through
    pooling / flatten / channel concatenation / residual adds, ends at a full-precision conv/linear (the scale
    folds into its weights), at an activation (an IF neuron takes any per-channel input scale into its
    threshold; an add aligns its operands per channel) or at the output. A binary consumer (its weights must stay
    ±1) or any other op makes the layer layer-wise."""
    def ok(node: fx.Node) -> bool:
        for user in node.users:
            m = gm.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(m, (BinaryConv2d, BinaryLinear)):
                    return False
                continue
            if isinstance(m, ACTIVATION_MODULES) or user.op == "output":
                continue
            if user.op == "call_function" and user.target in CAT_FUNCTIONS | ADD_FUNCTIONS:
                if not ok(user):  # the joined / summed value carries the per-channel scale on
                    return False
                continue
            if not is_pass_through(gm, user, _PASS_THROUGH) or not ok(user):
                return False
        return bool(node.users)

    return {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in names and ok(n)}
