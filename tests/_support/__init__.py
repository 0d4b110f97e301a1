"""Helpers shared by the test packages (one place each; none of them uses the code under test).

* :mod:`_support.files` - md5 of a file, image folders (random pixels, or colour classes);
* :mod:`_support.similarity` - row-wise cosine similarity of two batches;
* :mod:`_support.references` - independent forward-hook references for backbone activations;
* :mod:`_support.synth_store` - tiny synthetic store inputs (store tests and their child processes);
* :mod:`_support.blob_store` - Gaussian-blob feature stores (out-of-core heads tests, peak RSS).

``tests/conftest.py`` puts ``tests/`` on ``sys.path``; child processes add it themselves
(:data:`TESTS`).
"""

from __future__ import annotations

from pathlib import Path

#: The ``tests`` folder (put it on ``PYTHONPATH`` of a child process that imports ``_support``).
TESTS = Path(__file__).resolve().parents[1]
