"""Spiking building blocks: reference IF math, neuron modules, kernels, encoders and the network container."""

from bsnn.snn.functional import if_multistep, if_step
from bsnn.snn.network import SpikingNetwork
from bsnn.snn.neuron import ChannelScale, IFNeuron, Integrator

__all__ = ["ChannelScale", "IFNeuron", "Integrator", "SpikingNetwork", "if_multistep", "if_step"]
