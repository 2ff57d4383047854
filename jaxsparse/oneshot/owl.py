"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML, arXiv:2310.05175).

Layers with more activation outliers are pruned less. A layer's outlier ratio ``D_l`` is the
percentage of its Wanda scores ``|W_ij| * ||X_i||_2`` above ``M`` times their mean (over all the
weights of the layer; a "layer" is a transformer block in the paper, all its linear layers
together). The ratios are mapped linearly onto ``[0, 2 * lambda]``, centred, and added to the target
density: ``density_l = 1 - s + (D_l - min D) / (max D - min D) * 2 lambda - mean(...)``, so the
sparsities lie in ``[s - lambda, s + lambda]`` and average ``s`` over the layers (unweighted by
size, as in the reference code's ``prune_wanda_outlier``). Defaults ``M = 5``, ``lambda = 0.08``
are the paper's setting for LLaMA (Section 4, and its ablation of both).

``owl(...)`` is a :class:`jaxsparse.Distribution` (accepted wherever one-shot pruning takes a
sparsity, like ``llm-compressor``'s ``sparsity_profile="owl"``), but it needs calibration
scores, not just shapes: :func:`jaxsparse.prune_oneshot` computes them on the dense model and
calls :meth:`OWL.solve_scores`.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from jaxsparse.distributions import Distribution

__all__ = ["OWL", "owl"]


class OWL(Distribution):
    """Per-layer sparsities from outlier ratios (see the module docstring)."""

    def __init__(self, sparsity, *, outlier_threshold: float = 5.0, lam: float = 0.08, layer_of=None):
        super().__init__(sparsity, "owl")
        self.outlier_threshold = float(outlier_threshold)
        self.lam = float(lam)
        if not self.outlier_threshold > 0 or not 0 <= self.lam:
            raise ValueError(f"owl needs outlier_threshold (M) > 0 and lam >= 0; got {outlier_threshold}, {lam}")
        if not self.lam <= min(self.sparsity, 1 - self.sparsity):
            raise ValueError(
                f"owl: lam={self.lam} would put some layer's sparsity outside [0, 1) around {self.sparsity}; "
                f"use lam <= {min(self.sparsity, 1 - self.sparsity)}"
            )
        self.layer_of = _layer_function(layer_of)

    def __repr__(self):
        return f"owl({self.sparsity}, outlier_threshold={self.outlier_threshold}, lam={self.lam})"

    def solve(self, shapes):
        raise ValueError(
            "owl() needs calibration data (its targets come from the layers' outlier ratios): pass it as the "
            "sparsity of jaxsparse.prune_oneshot, or call solve_scores with each leaf's Wanda scores"
        )

    def outlier_ratios(self, scores: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Percentage of scores above ``M`` times their mean, per OWL layer (see ``layer_of``)."""
        groups: dict[str, list] = {}
        for name, score in scores.items():
            groups.setdefault(self.layer_of(name), []).append(np.ravel(np.asarray(score, np.float64)))
        ratios = {}
        for layer, parts in groups.items():
            flat = np.concatenate(parts)
            ratios[layer] = 100.0 * float(np.mean(flat > self.outlier_threshold * np.mean(flat)))
        return ratios

    def solve_scores(self, scores: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Each leaf's sparsity from the Wanda scores of all pruned leaves ``{name: scores}``."""
        ratios = self.outlier_ratios(scores)
        d = np.array(list(ratios.values()), np.float64)
        spread = d.max() - d.min()
        d = (d - d.min()) / spread * 2 * self.lam if spread > 0 else np.zeros_like(d)
        density = d - d.mean() + (1.0 - self.sparsity)
        by_layer = {layer: float(np.clip(1.0 - x, 0.0, np.nextafter(1.0, 0.0))) for layer, x in zip(ratios, density)}
        return {name: by_layer[self.layer_of(name)] for name in scores}


def _layer_function(layer_of) -> Callable[[str], str]:
    if layer_of is None:
        return lambda name: name
    if callable(layer_of):
        return layer_of
    pattern = re.compile(layer_of)

    def by_pattern(name):
        found = pattern.search(name)
        return found.group(0) if found else name

    return by_pattern


def owl(sparsity: float, *, outlier_threshold: float = 5.0, lam: float = 0.08, layer_of=None) -> OWL:
    """OWL layerwise sparsity at average ``sparsity`` (Yin et al., 2024, arXiv:2310.05175).

    Args:
      sparsity: the average target over the layers.
      outlier_threshold: the paper's ``M``: a score is an outlier above ``M`` times its layer's mean.
      lam: the paper's ``lambda``: layer sparsities lie within ``sparsity +- lam``.
      layer_of: what an OWL "layer" is: ``None`` (each pruned leaf on its own), a regex whose
        first match in a leaf's name names its layer (``r"block_\\d+"``: the paper's transformer
        blocks), or a callable ``name -> layer``.
    """
    return OWL(sparsity, outlier_threshold=outlier_threshold, lam=lam, layer_of=layer_of)
