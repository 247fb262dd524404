"""Pruning methods: score functions plus budget rules producing bool keep-masks ``{fqn: mask}``.

Methods: one-shot magnitude (``magnitude_masks``), one-shot activation-aware Wanda (``wanda_masks``), gradual magnitude pruning (``GMP``), PQ Index + SAP
(``SAP``, ``pq_index``), PDP (``PDP``), SNACS (``snacs_scores`` + ``snacs_masks``) and PSAP (``PSAP``, our
interpretation). ``training.attach`` / ``training.train`` run them inside a training loop.
"""
from .base import FixedMasks, Pruner, apply_masks, channel_sparsity, masked_copy, masks_sparsity
from .gmp import GMP, gmp_sparsity
from .magnitude import magnitude_masks, prunable_layers
from .mi import hash_cmi, hash_mi
from .pdp import PDP, pdp_soft_mask, pdp_target, pdp_threshold
from .pqi import pq_index, sap_keep_bound, sap_prune_count
from .psap import PSAP, psap_layer_counts, weight_sparsity_ratio
from .sap import SAP, Rewinder, sap_round
from .scores import channel_norm, channel_rms, magnitude
from .snacs import SnacsResult, SnacsScores, balanced_indices, snacs_masks, snacs_scores
from .training import attach, evaluate, train
from .wanda import wanda_masks

__all__ = [
    "FixedMasks", "Pruner", "apply_masks", "masked_copy", "channel_sparsity", "masks_sparsity",
    "GMP", "gmp_sparsity",
    "magnitude_masks", "prunable_layers",
    "hash_mi", "hash_cmi",
    "PDP", "pdp_soft_mask", "pdp_target", "pdp_threshold",
    "pq_index", "sap_keep_bound", "sap_prune_count",
    "PSAP", "psap_layer_counts", "weight_sparsity_ratio",
    "SAP", "Rewinder", "sap_round",
    "magnitude", "channel_norm", "channel_rms",
    "SnacsResult", "SnacsScores", "balanced_indices", "snacs_masks", "snacs_scores",
    "attach", "evaluate", "train",
    "wanda_masks",
]
