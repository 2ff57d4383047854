"""One-shot (post-training) pruning of trained models from calibration data.

- ``hessian``: :class:`HessianState`, :func:`hessian_init`, :func:`hessian_update`: a layer's
  input statistics accumulated chunk by chunk (and over data-parallel shards).
- ``layer``: :func:`wanda` (Sun et al., 2023, arXiv:2306.11695) and :func:`sparsegpt` (Frantar &
  Alistarh, 2023, arXiv:2301.00774) on one ``(in, out)`` weight; unstructured and N:M.
- ``owl``: :func:`owl`, outlier-weighted layerwise sparsity (Yin et al., 2024, arXiv:2310.05175).
- ``driver``: :func:`prune_oneshot`, the whole flax model (linen or nnx), layer by layer
  (flax is imported only when it is called).
"""

from jaxsparse.oneshot.driver import prune_oneshot
from jaxsparse.oneshot.hessian import HessianState, hessian_init, hessian_update
from jaxsparse.oneshot.layer import sparsegpt, wanda
from jaxsparse.oneshot.owl import OWL, owl

__all__ = ["prune_oneshot", "HessianState", "hessian_init", "hessian_update", "sparsegpt", "wanda", "OWL", "owl"]
