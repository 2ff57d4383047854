"""jaxsparse: functional sparsity for JAX.

Masks are pytrees alongside params; sparsifiers are optax gradient transformations that keep
params exactly sparse inside an ordinary jit-compiled training loop. See DESIGN.md.

Where things are: the core transformation in ``core``; shared machinery in ``masks``, ``leaves``,
``selection``, ``scores``, ``distributions``, ``schedules``, ``structures`` and ``dst`` (dynamic sparse training);
one module per method family: ``pruning`` (magnitude, random, saliency, global, LAMP, static),
``rigl`` (SET and RigL), ``snfs``, ``srigl``, ``topkast``, ``ste`` (STE, SR-STE, ST-3),
``autosparse``, ``progressive`` (MDGF, SDGF); ``oneshot`` (Wanda, SparseGPT, OWL: post-training
pruning from calibration data); ``export``, ``checkpoint``, ``sharding``. Flax layers (block-sparse dense and
attention) are in ``jaxsparse.nn``, loaded on first use because they need flax.
"""

import importlib

from jaxsparse import scores
from jaxsparse.checkpoint import checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxsparse.core import (
    LeafPlan,
    SparsifierState,
    Topology,
    TopologyInputs,
    get_masks,
    get_plan,
    get_shadow,
    init,
    periodic_updates,
    sparsifier,
)
from jaxsparse.distributions import Distribution, er, erk, uniform
from jaxsparse.export import BitmaskTensor, NMTensor, compress, decompress, load_compressed, save_compressed
from jaxsparse.leaves import leaf_paths, path_to_str, select_leaves
from jaxsparse.masks import apply_masks, count_nonzeros, dense_masks, mask_sparsity, masks_from_params
from jaxsparse.oneshot import (
    OWL,
    HessianState,
    hessian_init,
    hessian_update,
    owl,
    prune_oneshot,
    sparsegpt,
    wanda,
)
from jaxsparse.pruning import (
    global_magnitude_pruning,
    lamp_pruning,
    magnitude_pruning,
    pruning,
    random_pruning,
    saliency_pruning,
    static_sparse,
)
from jaxsparse.rigl import dynamic_sparse, rigl, set_sparse
from jaxsparse.report import SparsityPreview, SparsityReport, preview_sparsity, sparsity_report
from jaxsparse.schedules import (
    SparsitySchedule,
    cosine_drop_fraction,
    one_shot_schedule,
    polynomial_schedule,
)
from jaxsparse.sharding import abstract_state, state_shardings
from jaxsparse.selection import top_k_mask, top_k_masks, top_k_masks_nested, top_k_masks_per_leaf, top_k_per_column
from jaxsparse.snfs import snfs
from jaxsparse.srigl import srigl
from jaxsparse.structures import Structure, blocks, channels, constant_fan_in, n_of_m, unstructured
from jaxsparse.topkast import topkast
from jaxsparse.ste import sr_ste, st3, ste
from jaxsparse.autosparse import autosparse, autosparse_alpha
from jaxsparse.progressive import mdgf, sdgf, sdgf_stages
from jaxsparse.schedules import mask_decay, sigmoid_cosine_decay

__version__ = "0.1.0"

__all__ = [
    # the core transformation and masks
    "sparsifier", "SparsifierState", "Topology", "TopologyInputs", "LeafPlan", "get_masks", "init", "periodic_updates",
    "apply_masks", "count_nonzeros", "dense_masks", "mask_sparsity", "masks_from_params",
    "leaf_paths", "path_to_str", "select_leaves",
    # distributions, schedules, scores, selection
    "Distribution", "uniform", "erk", "er",
    "SparsitySchedule", "polynomial_schedule", "one_shot_schedule", "cosine_drop_fraction",
    "scores", "top_k_mask", "top_k_masks", "top_k_masks_per_leaf", "top_k_masks_nested", "top_k_per_column",
    # pruning
    "pruning", "magnitude_pruning", "random_pruning", "saliency_pruning",
    "global_magnitude_pruning", "lamp_pruning", "static_sparse",
    # dynamic sparse training
    "dynamic_sparse", "set_sparse", "rigl", "snfs", "srigl", "topkast",
    # structures
    "Structure", "unstructured", "n_of_m", "blocks", "channels", "constant_fan_in",
    # gradient annealing and the straight-through family
    "ste", "sr_ste", "st3", "autosparse", "autosparse_alpha", "mdgf", "sdgf", "sdgf_stages",
    "sigmoid_cosine_decay", "mask_decay", "get_shadow",
    # the plan a sparsifier state was trained with (structures, budgets)
    "get_plan",
    # export: compressed formats and files
    "compress", "decompress", "save_compressed", "load_compressed", "BitmaskTensor", "NMTensor",
    # sharding and checkpoints
    "state_shardings", "abstract_state", "checkpoint_manager", "save_checkpoint", "restore_checkpoint",
    # one-shot pruning of trained models
    "wanda", "sparsegpt", "owl", "OWL", "prune_oneshot", "HessianState", "hessian_init", "hessian_update",
    # reporting
    "SparsityReport", "sparsity_report", "SparsityPreview", "preview_sparsity",
]


def __getattr__(name):
    if name in ("nn", "attention"):  # flax-dependent: imported only when asked for (attention: old path)
        return importlib.import_module(f"jaxsparse.{name}")
    if name == "nnx_optimizer":
        return importlib.import_module("jaxsparse.nn.optimizer").nnx_optimizer
    raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")
