"""Test-session settings."""

import os
import tempfile

# Training subprocesses share one compilation cache for the session (not the user's): the same
# smoke configs are compiled by several tests.
os.environ.setdefault('MODERNIZE_COMPILATION_CACHE',
                      tempfile.mkdtemp(prefix='modernize-test-jax-cache-'))
