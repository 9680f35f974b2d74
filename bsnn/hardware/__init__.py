"""In-memory-computing (IMC) hardware cost model: presets, crossbar mapping, constraints in simulation, cost.

    import bsnn.hardware as hwm
    report = hwm.estimate(snn, sim_result, "spikesim-rram-65nm", timesteps=5, mode="dense")
    report.total.energy_pj, report.total.latency_ns, report.total.area_um2

See :mod:`bsnn.hardware.cost` for the formulas (SpikeSim's analytical model in ``dense`` mode) and
:mod:`bsnn.hardware.config` for the presets and their sources.
"""

from bsnn.hardware.config import (AreaTable, EnergyTable, HardwareConfig, PRESETS, hardware_from_dict, list_presets,
                                  load_hardware_config, preset, resolve_hardware)
from bsnn.hardware.constraints import ConstraintConfig, apply_constraints, constrained
from bsnn.hardware.cost import (Activity, CostReport, CostTotal, LayerCost, activity_from_sim, estimate,
                                sweep_timesteps)
from bsnn.hardware.mapping import LayerMapping, LayerSpec, layer_specs_from_network, load_layer_table, map_layer

__all__ = [
    "Activity", "AreaTable", "ConstraintConfig", "CostReport", "CostTotal", "EnergyTable", "HardwareConfig",
    "LayerCost", "LayerMapping", "LayerSpec", "PRESETS", "activity_from_sim", "apply_constraints", "constrained",
    "estimate", "hardware_from_dict", "layer_specs_from_network", "list_presets", "load_hardware_config",
    "load_layer_table", "map_layer", "preset", "resolve_hardware", "sweep_timesteps",
]
