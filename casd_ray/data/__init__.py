"""Data: datasets as in-memory uint8 arrays, their splits, and seeded batches.

Rule: ``data/`` imports only :mod:`casd_ray.config` and :mod:`casd_ray.errors` from casd_ray.
:mod:`~casd_ray.data.load` is the entry (and the only caller of downloads);
:mod:`~casd_ray.data.readers` and :mod:`~casd_ray.data.imagefolder` parse formats;
:mod:`~casd_ray.data.splits` holds the arrays; :mod:`~casd_ray.data.batches` draws batches
that are identical for every trial of a seed (common random numbers).
"""
