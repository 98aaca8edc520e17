import atexit
import os
import shutil
import sys
import tempfile

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

# JAX's persistent compilation cache, in a directory of this run's own. Many tests compile the
# same program (a solver's loop for the shared cases' shapes) through different closures,
# which JAX's in-memory cache, keyed by the traced function, compiles again; the persistent
# cache is keyed by the compiled program and its flags, so the second compile is a read.
# Measured: test_jax_backend and test_trust_convergence 89 s -> 80 s. Results cannot depend on
# it (the same program gives the same executable); the directory is fresh for each run and
# removed at exit, so no run reads another's. A user's own cache directory is kept; set
# PRDP_TESTS_NO_COMPILE_CACHE=1 to compile everything afresh.
if not os.environ.get("PRDP_TESTS_NO_COMPILE_CACHE") and not os.environ.get(
        "JAX_COMPILATION_CACHE_DIR"):
    _CACHE_DIR = tempfile.mkdtemp(prefix="prdp-tests-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
