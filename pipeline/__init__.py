"""An energy-based model of handwritten digits, trained by contrastive divergence with Langevin sampling."""

__version__ = "0.1.0"
