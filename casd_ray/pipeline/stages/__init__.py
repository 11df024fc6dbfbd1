"""The training stages: teacher, fine-tune, audit (and ``student``, what they share).

Rule: a stage is a function of the previous stage's artefacts and its own config section; it
never imports another stage (the shared ``student`` aside) nor ``search/``, and only
:mod:`casd_ray.pipeline.run` calls it.
"""
