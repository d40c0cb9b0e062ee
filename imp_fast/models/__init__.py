"""Domain models for the paper's case studies (one module per domain).

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for
``imp-fast reproduce <case>``; submodules are imported on demand, not here.
"""
