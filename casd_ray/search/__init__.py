"""The width search on Ray Tune: trials, searchers, rungs, storage and Tune's state.

Rule: only ``search/`` imports ray. It reads the teacher and data through their artefacts,
turns Tune's results into the trials table (:mod:`casd_ray.artifacts.trials`), and never
imports a pipeline stage.
"""
