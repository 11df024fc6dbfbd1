"""Architectures as width specs: what a network is, what it costs, how it is cut.

Rule: ``models/`` imports nothing of casd_ray but :mod:`casd_ray.errors`. Architectures know
no config, data, training or search; everything else reaches them through
:mod:`casd_ray.models.family` (specs and the :class:`~casd_ray.models.base.ModelFamily` of
each), :mod:`casd_ray.models.names` (names, checked without torch) and
:mod:`casd_ray.models.cost` (FLOPs and latency measured on real forwards).
"""
