"""Drop-in replacements for other libraries' solver APIs.

* :mod:`imp_fast.compat.torchdeq`: torchdeq's ``anderson_solver``, ``broyden_solver``,
  ``fixed_point_iter``, ``simple_fixed_point_iter``, ``get_solver`` (and ``register_solvers`` for
  ``torchdeq.get_deq``), with torchdeq's semantics where users depend on them.
* :mod:`imp_fast.compat.deq`: locuslab/deq's ``anderson`` and ``broyden`` returning its
  result dicts.

Both follow their library's meaning of Anderson's ``lam`` (an absolute ridge on
``G G^T``), which differs from :func:`imp_fast.solve`'s (relative to the newest
residual's squared norm); see :mod:`imp_fast.compat._loop`.
"""
