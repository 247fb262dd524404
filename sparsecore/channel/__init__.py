"""Channel pruning made fast: dependency tracing, physical slicing, block masks for the channel kernel.

>>> groups = channel_groups(model, x)                       # coupled channels, for a pruner
>>> plan = plan_slim(model, masks, x, round_to=8)           # what shrinks, what keeps zeroed channels
>>> small = apply_plan(model, plan)                         # == masked_reference(model, plan.masks, x)
>>> blocks = channel_weight_masks(small, plan.residual_masks, x)   # ChannelWeight masks for the rest
"""
from .slim import (SlimPlan, apply_plan, channel_weight_masks, dead_channels, is_slimmed, mark_slimmed, masked_reference,
                   plan_slim, slim)
from .trace import ChannelGraph, ChannelGroup, channel_groups, trace_channels

__all__ = ["ChannelGraph", "ChannelGroup", "SlimPlan", "apply_plan", "channel_groups", "channel_weight_masks",
           "dead_channels", "is_slimmed", "mark_slimmed", "masked_reference", "plan_slim", "slim", "trace_channels"]
