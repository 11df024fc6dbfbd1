"""casd-ray: compress a CNN by searching channel widths with distillation, on Ray Tune."""

__version__ = "0.1.0"
