"""casd-ray: compress a CNN by searching channel widths with distillation, on Ray Tune.

    import casd_ray
    result = casd_ray.compress(model, train_set, val_set, budget={"flops": 0.5})
    net = casd_ray.load_compressed("runs/<name>/winner")

The names are imported on first use: ``import casd_ray`` (the command line, Ray workers)
does not pay for torch until one is needed.
"""

__version__ = "0.2.0"

__all__ = ["Result", "compress", "load_compressed", "result_of"]

_WHERE = {
    "compress": "casd_ray.api",
    "Result": "casd_ray.api",
    "result_of": "casd_ray.api",
    "load_compressed": "casd_ray.artifacts.network",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'casd_ray' has no attribute {name!r}")
