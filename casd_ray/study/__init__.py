"""Studies of the method itself: ``casd-ray compare`` and its arms over several seeds.

Rule: ``study/`` runs the pipeline through :func:`casd_ray.pipeline.run.execute` and the
shared student recipe; it adds arms (baselines), never a second way to train.
"""
