"""What to keep: the search space, budget repair, weight inheritance and no-search baselines.

Rule: ``widths/`` imports only ``models/``, ``config`` and ``errors`` — never ``train/``,
``data/``, ``search/`` or ray — so width logic stays pure and testable on a CPU in
milliseconds.
"""
