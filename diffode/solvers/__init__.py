"""The steppers, one file per family, and what they share.

``base.py`` is the interface the solve loop uses (start there to write a new
solver), ``butcher.py`` the Butcher tableau, ``explicit_rk.py``, ``sdirk.py``,
``radau.py`` and ``rosenbrock.py`` the methods, ``stage_newton.py`` the
simplified Newton iteration of the implicit stages, ``linear.py`` the linear-solver
protocol with dense LU and GMRES that every implicit method (and ``steady_state``)
uses, ``structured.py`` the banded and sparse LU, and ``colouring.py`` sparse
Jacobians from a pattern.
"""
