"""casd-ray: compress a CNN by searching channel widths with distillation, on Ray Tune."""

__version__ = "0.1.0"

__all__ = ["load_compressed"]


def __getattr__(name: str):
    # Lazy: `import casd_ray` (the CLI, Ray workers) should not pay for importing torch.
    if name == "load_compressed":
        from casd_ray.export import load_compressed

        return load_compressed
    raise AttributeError(f"module 'casd_ray' has no attribute {name!r}")
