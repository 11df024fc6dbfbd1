"""The report: ``report.md`` / ``report.json`` and plots, rebuilt from a run folder's files.

Rule: ``report/`` reads artifacts only (``artifacts/``, :mod:`casd_ray.files`,
:mod:`casd_ray.errors`): ``casd-ray report RUN_DIR`` works on any machine that has the folder,
with nothing recomputed.
"""
