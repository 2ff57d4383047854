"""jaxsparse: functional sparsity for JAX.

Masks are pytrees alongside params; sparsifiers are optax gradient transformations that keep
params exactly sparse inside an ordinary jit-compiled training loop. See DESIGN.md.
"""

from jaxsparse.distributions import Distribution, er, erk, uniform
from jaxsparse.leaves import leaf_paths, path_to_str, select_leaves
from jaxsparse.masks import apply_masks, count_nonzeros, dense_masks, mask_sparsity, masks_from_params
from jaxsparse.pruning import (
    global_magnitude_pruning,
    lamp_pruning,
    magnitude_pruning,
    pruning,
    random_pruning,
    saliency_pruning,
    static_sparse,
)
from jaxsparse.report import SparsityReport, sparsity_report
from jaxsparse.schedules import (
    SparsitySchedule,
    constant_schedule,
    cosine_drop_fraction,
    one_shot_schedule,
    polynomial_schedule,
)
from jaxsparse import scores
from jaxsparse.selection import top_k_mask, top_k_masks
from jaxsparse.core import (
    LeafPlan,
    SparsifierState,
    Topology,
    TopologyInputs,
    get_masks,
    periodic_updates,
    sparsifier,
)

# --- dynamic sparse training (issue 3) ---
from jaxsparse.dst import dynamic_sparse, rigl, set_sparse
from jaxsparse.snfs import snfs
from jaxsparse.srigl import srigl
from jaxsparse.topkast import topkast

__version__ = "0.1.0"

__all__ = [
    "Distribution", "uniform", "erk", "er",
    "leaf_paths", "path_to_str", "select_leaves",
    "apply_masks", "count_nonzeros", "dense_masks", "mask_sparsity", "masks_from_params",
    "pruning", "magnitude_pruning", "random_pruning", "saliency_pruning",
    "global_magnitude_pruning", "lamp_pruning", "static_sparse",
    "SparsityReport", "sparsity_report",
    "SparsitySchedule", "polynomial_schedule", "constant_schedule", "one_shot_schedule", "cosine_drop_fraction",
    "scores", "top_k_mask", "top_k_masks",
    "SparsifierState", "LeafPlan", "Topology", "TopologyInputs", "sparsifier", "get_masks", "periodic_updates",
    # --- dynamic sparse training (issue 3) ---
    "dynamic_sparse", "set_sparse", "rigl", "snfs", "srigl", "topkast",
]
