"""File formats of a run: exported networks, the trials table, the stage summaries.

Rule: ``artifacts/`` imports only ``models/``, :mod:`casd_ray.files` and
:mod:`casd_ray.errors`. Stages read each other's outputs through these formats, never through
each other's code.
"""
