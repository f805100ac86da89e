"""Test-session settings.

The tests compile many small programs and run each a few times, so XLA's backend
optimisation (LLVM) costs far more than it saves: compile without it unless XLA_FLAGS
says otherwise. This must happen before JAX creates its backend.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
