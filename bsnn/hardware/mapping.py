"""Layer tables and their mapping onto crossbars, PEs and tiles.

A :class:`LayerSpec` describes one synaptic (conv / linear) layer in hardware terms; it comes from a converted
:class:`~bsnn.snn.network.SpikingNetwork` (:func:`layer_specs_from_network`) or from a SpikeSim/NeuroSim-style
CSV table (:func:`load_layer_table`: ``name,in_channels,out_channels,in_size,out_size,kernel``).
:func:`map_layer` places it on crossbars of ``xbar_rows x xbar_cols``:

* ``spikesim`` mapping (Moitra et al., TCAD 2023): a PE holds k² crossbars, one per kernel offset, input
  channels on the rows, output channels on the columns; PEs = ceil(Cin/rows)·ceil(Cout/cols). The k² arrays of a
  PE share its ADCs, so one conversion sums k²·min(Cin, rows) rows.
* ``unrolled`` mapping: rows = Cin·k² (im2col), one crossbar per PE; PEs = ceil(Cin·k²/rows)·ceil(Cout/cols).

Sign handling of {0,1} spikes x ±1 weights: ``none`` (signed cells, SpikeSim's model), ``popcount`` (w ∈ {0,1},
Σ s·w = 2·popcount(s∧w) − popcount(s): no extra columns, one digital popcount per input slice and one
subtraction per partial sum) or ``paired`` (positive and negative columns: twice the columns, PEs and
conversions, one subtraction per partial sum). Full-precision layers use ceil(fp_weight_bits/weight_cell_bits)
columns per weight where the preset sets a cell precision (SpikeSim's model: one cell per weight).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from bsnn.errors import ConfigError, DataError
from bsnn.hardware.config import HardwareConfig
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.neuron import IFNeuron, Integrator
from bsnn.snn.pool import SpikingMaxPool2d


@dataclass
class LayerSpec:
    """One synaptic layer in hardware terms.

    Attributes:
        name: layer name (the SpikingNetwork module name or the table's ``name``).
        in_channels / out_channels: Cin, Cout (input / output features of a linear layer).
        kernel: (kh, kw); (1, 1) for linear layers.
        in_size: input map (H, W); (1, 1) for linear layers.
        out_size: positions (H, W) at which the layer is evaluated (crossbar reads per pass). For a network this
            is the conv output; SpikeSim's own layer lists give the size *after* the following pooling here.
        neuron_size: map (H, W) of the neurons the layer feeds (after pooling): membrane memory; None = out_size.
        groups: convolution groups.
        binary: ±1 weights (one cell per weight); False = full-precision weights.
        analog_input: the layer reads the analog input (direct encoding), not spikes.
        input_neurons: IF layers whose spikes feed the layer (activity lookup in a SimResult).
        kind: ``"conv"`` or ``"linear"``.
        input_passes: crossbar passes per timestep its spike inputs need: 1 for {0, 1} spikes; bit-serial
            ``ceil(log2(Γ + 1))`` for burst spikes, 2 for signed spikes (:attr:`bsnn.snn.neuron.IFNeuron.input_passes`).
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple = (1, 1)
    in_size: tuple = (1, 1)
    out_size: tuple = (1, 1)
    neuron_size: tuple | None = None
    groups: int = 1
    binary: bool = True
    analog_input: bool = False
    input_neurons: list = field(default_factory=list)
    kind: str = "conv"
    input_passes: int = 1

    @property
    def positions(self) -> int:
        """Output positions evaluated per pass (H_out·W_out)."""
        return int(self.out_size[0] * self.out_size[1])

    @property
    def kernel_area(self) -> int:
        return int(self.kernel[0] * self.kernel[1])

    @property
    def macs(self) -> int:
        """Multiply-accumulates per pass (one timestep, one sample): positions·Cout·(Cin/groups)·k²."""
        return self.positions * self.out_channels * (self.in_channels // self.groups) * self.kernel_area

    @property
    def in_activations(self) -> int:
        """Stored input activations Cin·H_in·W_in (input buffer)."""
        return int(self.in_channels * self.in_size[0] * self.in_size[1])

    @property
    def neurons(self) -> int:
        """Neurons fed by the layer, Cout·H·W of ``neuron_size`` (membrane memory)."""
        size = self.neuron_size or self.out_size
        return int(self.out_channels * size[0] * size[1])


@dataclass
class LayerMapping:
    """Where one layer lands on the hardware.

    Attributes:
        row_groups: input slices (crossbar rows used per slice ≤ xbar_rows); partial sums per output per pass.
        col_groups: column slices (outputs x columns per output over xbar_cols).
        cols_per_output: columns per output channel (weight slices x 2 for paired columns).
        xbars_per_pe: crossbars in one PE (k² for the spikesim mapping, 1 unrolled).
        pes / crossbars: totals for the layer (groups included).
        rows_per_pe: mean input rows read by one PE (event-driven gating: a PE read is skipped when all are 0).
        rows_per_conversion: most rows summed into one ADC conversion.
        adc_bits_exact: ADC bits for an exact conversion (⌈log2(rows+1)⌉, +1 sign bit for signed cells).
        utilisation: used cells / cells of the allocated crossbars.
    """

    name: str
    mapping: str
    sign_handling: str
    row_groups: int
    col_groups: int
    cols_per_output: int
    xbars_per_pe: int
    pes: int
    crossbars: int
    rows_per_pe: float
    rows_per_conversion: int
    adc_bits_exact: int
    utilisation: float

    def to_dict(self) -> dict:
        return asdict(self)


def map_layer(spec: LayerSpec, hw: HardwareConfig) -> LayerMapping:
    """Place ``spec`` on ``hw``'s crossbars (see the module docstring for both mappings)."""
    g = spec.groups
    if spec.in_channels % g or spec.out_channels % g:
        raise ConfigError(f"layer {spec.name!r}: channels {spec.in_channels}/{spec.out_channels} not divisible by "
                          f"groups={g}")
    cin, cout, k2 = spec.in_channels // g, spec.out_channels // g, spec.kernel_area
    rows, cols = hw.xbar_rows, hw.xbar_cols
    weight_cols = 1 if (spec.binary or hw.weight_cell_bits is None) else math.ceil(hw.fp_weight_bits /
                                                                                   hw.weight_cell_bits)
    cols_per_output = weight_cols * (2 if hw.sign_handling == "paired" else 1)
    if hw.mapping == "spikesim":
        row_groups, xbars_per_pe = math.ceil(cin / rows), k2
        rows_per_conversion = k2 * min(cin, rows)
    else:
        row_groups, xbars_per_pe = math.ceil(cin * k2 / rows), 1
        rows_per_conversion = min(cin * k2, rows)
    col_groups = math.ceil(cout * cols_per_output / cols)
    pes = g * row_groups * col_groups
    crossbars = pes * xbars_per_pe
    used = g * cin * k2 * cout * cols_per_output
    exact = math.ceil(math.log2(rows_per_conversion + 1)) + (1 if hw.sign_handling == "none" else 0)
    return LayerMapping(name=spec.name, mapping=hw.mapping, sign_handling=hw.sign_handling, row_groups=row_groups,
                        col_groups=col_groups, cols_per_output=cols_per_output, xbars_per_pe=xbars_per_pe, pes=pes,
                        crossbars=crossbars, rows_per_pe=cin * k2 / row_groups,
                        rows_per_conversion=rows_per_conversion, adc_bits_exact=exact,
                        utilisation=used / (crossbars * rows * cols))


def count_tiles(mappings: list[LayerMapping], hw: HardwareConfig) -> int:
    """Tiles = ceil(Σ PEs / pe_per_tile): layers share tiles (SpikeSim's ``pe_tile_count``)."""
    return math.ceil(sum(m.pes for m in mappings) / hw.pe_per_tile)


# ------------------------------------------------------------------------------------ layer tables
def _whole(text: str) -> int:
    """``"32"`` or ``"32.0"`` -> 32; anything else (``"2.5"``, ``"inf"``, ``"nan"``, ``""``) raises ValueError."""
    try:
        return int(text)
    except ValueError:
        f = float(text)
        if not f.is_integer():
            raise
        return int(f)


def _size(value: str, where: str) -> tuple:
    text = str(value).strip().lower()
    try:
        parts = [_whole(p) for p in text.split("x")] if "x" in text else [_whole(text)] * 2
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: expected a size like 32 or 32x16, got {value!r}") from None
    if len(parts) != 2 or min(parts) < 1:
        raise ConfigError(f"{where}: expected a positive size like 32 or 32x16, got {value!r}")
    return tuple(parts)


def _bool(value: str, where: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n", ""):
        return False
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


TABLE_COLUMNS = ("name", "in_channels", "out_channels", "in_size", "out_size", "kernel")
OPTIONAL_COLUMNS = ("groups", "binary", "analog_input", "neuron_size")


def load_layer_table(path: str | Path) -> list[LayerSpec]:
    """Read a SpikeSim/NeuroSim-style layer table.

    Required columns ``name,in_channels,out_channels,in_size,out_size,kernel`` (sizes square ints or ``HxW``;
    a linear layer is ``kernel 1``, sizes 1); optional ``groups``, ``binary`` (default true),
    ``analog_input`` (default: true for the first row only), ``neuron_size`` (default out_size).
    As in SpikeSim's own lists, ``out_size`` is the number of positions costed; SpikeSim gives the size after
    the pooling that follows each conv there.

    Raises:
        DataError: missing file. ConfigError: missing column or malformed value (row and column named).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"layer table {str(p)!r} not found (columns: {','.join(TABLE_COLUMNS)})")
    try:
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(line for line in f if line.strip() and not line.lstrip().startswith("#"))
            rows = list(reader)
            header = [c.strip() if isinstance(c, str) else c for c in (reader.fieldnames or [])]
    except UnicodeDecodeError:
        raise ConfigError(f"layer table {str(p)!r} is not a text (UTF-8) CSV file; columns: "
                          f"{','.join(TABLE_COLUMNS)}") from None
    except csv.Error as e:
        raise ConfigError(f"layer table {str(p)!r} is not a valid CSV file ({e})") from None
    if not rows:
        raise ConfigError(f"layer table {str(p)!r} has no rows")
    rows = [{(k.strip() if isinstance(k, str) else k): v for k, v in r.items()} for r in rows]
    missing = [c for c in TABLE_COLUMNS if c not in header]
    if missing:
        raise ConfigError(f"layer table {str(p)!r} lacks column(s) {missing}; required: {','.join(TABLE_COLUMNS)}")
    unknown = [c for c in header if c not in TABLE_COLUMNS + OPTIONAL_COLUMNS]
    duplicate = sorted({c for c in header if header.count(c) > 1})
    if unknown or duplicate:
        what = f"unknown column(s) {unknown}" if unknown else f"duplicate column(s) {duplicate}"
        raise ConfigError(f"layer table {str(p)!r} has {what}; valid columns: {','.join(TABLE_COLUMNS)} (required), "
                          f"{','.join(OPTIONAL_COLUMNS)} (optional)")
    specs = []
    for i, r in enumerate(rows):
        where = f"{p.name} row {i + 1}"
        if None in r or any(r.get(c) is None for c in TABLE_COLUMNS):
            raise ConfigError(f"{where} has {'more' if None in r else 'fewer'} values than the {len(header)} "
                              f"columns ({','.join(header)})")
        try:
            cin, cout = _whole(r["in_channels"]), _whole(r["out_channels"])
            groups = _whole(r.get("groups") or "1")
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: channels/groups must be integers, got {r}") from None
        k = _size(r["kernel"], f"{where} kernel")
        out = _size(r["out_size"], f"{where} out_size")
        specs.append(LayerSpec(
            name=(r["name"] or f"layer{i}").strip(), in_channels=cin, out_channels=cout, kernel=k,
            in_size=_size(r["in_size"], f"{where} in_size"), out_size=out,
            neuron_size=_size(r["neuron_size"], f"{where} neuron_size") if r.get("neuron_size") else None,
            groups=groups, binary=_bool(r["binary"], f"{where} binary") if r.get("binary") else True,
            analog_input=_bool(r["analog_input"], f"{where} analog_input") if r.get("analog_input") else i == 0,
            kind="linear" if k == (1, 1) and out == (1, 1) else "conv"))
        if cin < 1 or cout < 1 or groups < 1:
            raise ConfigError(f"{where}: channels and groups must be >= 1")
    return specs


def _hw_pair(v) -> tuple:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v), int(v))


def layer_specs_from_network(snn) -> list[LayerSpec]:
    """Layer table of a converted network, with each layer's spike sources and neuron map.

    Shapes come from ``snn.layers``; the IF layers feeding each synaptic layer (through pooling, flatten, scaling
    or residual adds) and the map of the neurons it feeds come from the spiking fx graph (one shape-propagation
    pass on a zero input; the network's state is reset afterwards).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm: fx.GraphModule = snn.graph_module
    snn.reset()
    snn.set_time_chunk(1)
    try:
        with torch.no_grad():
            p = next(iter(gm.parameters()), None)
            ShapeProp(gm).propagate(torch.zeros(1, *snn.input_shape, device=p.device if p is not None else "cpu"))
    finally:
        snn.reset()
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}

    def module(n: fx.Node):
        return gm.get_submodule(n.target) if n.op == "call_module" else None

    def sources(n: fx.Node, seen: set) -> tuple[list[str], bool]:
        if n in seen:
            return [], False
        seen.add(n)
        if n.op == "placeholder":
            return [], True
        m = module(n)
        if isinstance(m, IFNeuron):
            return [n.target], False
        names, analog = [], False
        for a in n.all_input_nodes:
            s, an = sources(a, seen)
            names += s
            analog = analog or an
        return names, analog

    def neuron_map(n: fx.Node) -> tuple | None:
        todo, seen = list(n.users), set()
        while todo:
            u = todo.pop(0)
            if u in seen:
                continue
            seen.add(u)
            m = module(u)
            if isinstance(m, (IFNeuron, Integrator)) or u.op == "output":
                shape = n.meta["tensor_meta"].shape if u.op == "output" else u.meta["tensor_meta"].shape
                return tuple(int(s) for s in shape[2:4]) if len(shape) >= 4 else (1, 1)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            todo += list(u.users)
        return None

    specs = []
    for layer in snn.layers:
        node = nodes.get(layer["name"])
        if node is None:
            raise ConfigError(f"layer {layer['name']!r} of the layer table is not in the spiking graph")
        src, analog = sources(node.args[0], set())
        linear = layer["type"] == "Linear"
        ins, outs = layer["in_shape"], layer["out_shape"]
        specs.append(LayerSpec(
            name=layer["name"], in_channels=int(ins[0]), out_channels=int(layer["out_channels"]),
            kernel=(1, 1) if linear else _hw_pair(layer["kernel"]),
            in_size=(1, 1) if linear else (int(ins[1]), int(ins[2])),
            out_size=(1, 1) if linear else (int(outs[1]), int(outs[2])),
            neuron_size=(1, 1) if linear else neuron_map(node), groups=int(layer.get("groups", 1)),
            binary=bool(layer["binary"]), analog_input=analog and not src, input_neurons=list(dict.fromkeys(src)),
            kind="linear" if linear else "conv",
            input_passes=max([gm.get_submodule(n).input_passes for n in src], default=1)))
    return specs


@dataclass(frozen=True)
class PoolSpec:
    """One spiking max-pool (:class:`~bsnn.snn.pool.SpikingMaxPool2d`) in hardware terms: digital logic beside the
    crossbars — a spike counter per input neuron and, per output, ``window − 1`` comparisons and one subtraction
    each timestep.

    Attributes:
        name: module name in the spiking graph.
        inputs: input neurons per sample (C·H·W): one counter each.
        outputs: pooled outputs per sample (C·H'·W').
        window: neurons per pooling window (k², the largest window of an adaptive pool).
    """

    name: str
    inputs: int
    outputs: int
    window: int


def pool_specs_from_network(snn: SpikingNetwork) -> list[PoolSpec]:
    """The spiking max-pools of ``snn`` with their sizes (one shape pass on a zero sample)."""
    gm = snn.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                               SpikingMaxPool2d)]
    if not nodes:
        return []
    shapes = snn.node_shapes()
    specs = []
    for n in nodes:
        (c, h, w), (_, ho, wo) = shapes[n.args[0]][1:], shapes[n][1:]
        specs.append(PoolSpec(n.target, c * h * w, c * ho * wo, max(1, math.ceil(h / ho)) * max(1, math.ceil(w / wo))))
    return specs


def resolve_pools(network) -> list[PoolSpec]:
    """The spiking max-pools of a SpikingNetwork (layer tables and CSVs describe none)."""
    return pool_specs_from_network(network) if isinstance(network, SpikingNetwork) else []


def resolve_layers(network) -> list[LayerSpec]:
    """A layer table from a SpikingNetwork, a list of :class:`LayerSpec`, or a CSV path."""
    if isinstance(network, SpikingNetwork):
        return layer_specs_from_network(network)
    if isinstance(network, (str, Path)):
        return load_layer_table(network)
    if isinstance(network, (list, tuple)) and all(isinstance(s, LayerSpec) for s in network) and network:
        return list(network)
    raise ConfigError(f"estimate: expected a SpikingNetwork, a list of LayerSpec or a CSV path, got "
                      f"{type(network).__name__}")
