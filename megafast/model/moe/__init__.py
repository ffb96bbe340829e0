"""Mixture of experts: router, token dispatcher, experts, shared experts and the MoE layer."""

from megafast.model.moe.aux_loss import MoELossTracker
from megafast.model.moe.moe_layer import MoELayer

__all__ = ["MoELayer", "MoELossTracker"]
