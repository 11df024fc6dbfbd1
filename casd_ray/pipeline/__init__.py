"""The pipeline: stage order, fingerprints and reuse, and the stages themselves.

Rules: only :mod:`casd_ray.pipeline.run` calls the stages and ``search/``; stages
(``pipeline/stages/``) never import each other (the shared ``student`` aside) nor
``search/``, and read the search's output through ``artifacts/``. :mod:`casd_ray.api` and
``study/`` go through :func:`casd_ray.pipeline.run.execute`.
"""
