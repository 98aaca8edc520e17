import os
import sys

# Tests import the shared cases as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Most of the suite's time is XLA compiling small test programs once each (measured: about
# 0.3 s per compile, dozens per JAX test). LLVM's optimisation level changes how fast the
# generated code runs; XLA's HLO passes (fusion, buffer assignment, which the memory tests
# read) are unaffected. It can change the order of a vectorised reduction's sums (measured:
# one CG residual at its rounding-made last step moved), which the tests must tolerate
# anyway: their tolerances model any summation order (tests/helpers.py), as other CPUs'
# BLAS kernels and ../shared/tools/other_cpus.sh demand. A compile-bound test's CPU time
# falls by about a quarter. A user's own XLA_FLAGS are kept; set PRDP_TESTS_FULL_XLA_OPT=1
# to test at XLA's default optimisation.
if not os.environ.get("PRDP_TESTS_FULL_XLA_OPT"):
    _FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
