"""The one compiled part: the fused DARE kernel on raw checkpoint words (``lifelong_delta/delta/_words.c``).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the package installs without
it, and the streaming prune takes its torch path (the same bits, slower; ``lifelong_delta.delta._kernels.HAVE_WORDS``
tells which). ``-ffp-contract=off`` keeps ``base + delta * scale`` two roundings, as in torch.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]
setup(ext_modules=[Extension("lifelong_delta.delta._words", ["lifelong_delta/delta/_words.c"],
                             extra_compile_args=flags, optional=True)])
