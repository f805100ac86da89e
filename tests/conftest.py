"""Test-session settings.

XLA's CPU backend spends most of a small test's time compiling; LLVM optimisation level 1
compiles about three times faster than the default with the same results (it changes
code generation, not floating-point semantics) and, for the tiny shapes of the tests,
the same run time. A value already in XLA_FLAGS wins. This must run before JAX creates
its CPU client, which conftest.py does (it is imported before any test module).
"""

import os

_FLAG = "--xla_backend_optimization_level"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=1".strip()
