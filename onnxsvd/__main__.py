"""``python -m onnxsvd``: the same as the ``onnxsvd`` script."""

from __future__ import annotations

import sys

from onnxsvd.cli import main

sys.exit(main())
