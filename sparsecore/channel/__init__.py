"""Channel pruning made fast: dependency tracing, physical slicing, block masks for the channel kernel.

>>> groups = channel_groups(model, x)                       # coupled channels, for a pruner
>>> masks, skipped = group_channel_masks(model, trace_channels(model, x), 0.5)   # group-wise L2 selection
>>> plan = plan_slim(model, masks, x, round_to=8)           # what shrinks, what keeps zeroed channels
>>> small = apply_plan(model, plan)                         # == masked_reference(model, plan.masks, x)
>>> blocks = channel_weight_masks(small, plan.residual_masks, x)   # ChannelWeight masks for the rest
"""
from .heads import update_head_counts
from .select import group_channel_masks, l2_channel_scores
from .slim import (SlimPlan, apply_plan, channel_weight_masks, dead_channels, is_slimmed, mark_slimmed, masked_model,
                   masked_reference, plan_slim, record_skipped, skip_reasons, slim, slim_residual, slim_skipped,
                   slimmed_shapes, verify_slim)
from .trace import ChannelGraph, ChannelGroup, channel_groups, trace_channels

__all__ = ["ChannelGraph", "ChannelGroup", "SlimPlan", "apply_plan", "channel_groups", "channel_weight_masks",
           "dead_channels", "group_channel_masks", "is_slimmed", "l2_channel_scores", "mark_slimmed", "masked_model",
           "masked_reference", "plan_slim", "record_skipped", "skip_reasons", "slim", "slim_residual", "slim_skipped", "slimmed_shapes", "trace_channels", "update_head_counts",
           "verify_slim"]
