"""prdp_ops: differentiable iterative linear solvers and Progressively Refined
Differentiable Physics (PRDP).

The core imports only numpy and scipy. JAX lives in ``prdp_ops.backends.jax`` and CuPy in
``prdp_ops.backends.cupy``; both are imported only when used.
"""

from prdp_ops._controller import PRDPController as PRDPController
from prdp_ops._operators.base import LinearOperator as LinearOperator
from prdp_ops._operators.base import MatrixFreeError as MatrixFreeError
from prdp_ops._operators.convert import aslinearoperator as aslinearoperator
from prdp_ops._operators.dense import DenseOperator as DenseOperator
from prdp_ops._operators.dense import SparseOperator as SparseOperator
from prdp_ops._operators.function import FunctionOperator as FunctionOperator
from prdp_ops._operators.function import ScipyLinearOperator as ScipyLinearOperator
from prdp_ops._operators.stencil import DiffusionStencil as DiffusionStencil
from prdp_ops._operators.stencil import LaplacianStencil as LaplacianStencil
from prdp_ops._prdp_signals import gradient_fidelity as gradient_fidelity
from prdp_ops._solution import BlockSolveResult as BlockSolveResult
from prdp_ops._solution import Cotangents as Cotangents
from prdp_ops._solution import SolverError as SolverError
from prdp_ops._solution import SolveResult as SolveResult
from prdp_ops._solution import Status as Status
from prdp_ops._solve import solve as solve
from prdp_ops._solve import solve_vjp as solve_vjp
from prdp_ops._solver.base import IterativeSolver as IterativeSolver
from prdp_ops._solver.bicgstab import BiCGSTAB as BiCGSTAB
from prdp_ops._solver.cg import CG as CG
from prdp_ops._solver.gmres import GMRES as GMRES
from prdp_ops._solver.jacobi import Jacobi as Jacobi
from prdp_ops._solver.registry import available_solvers as available_solvers
from prdp_ops._solver.registry import get_solver as get_solver
from prdp_ops._solver.registry import register_solver as register_solver
from prdp_ops._solver.richardson import Richardson as Richardson
from prdp_ops._solver.sor import SOR as SOR
from prdp_ops._solver.steepest_descent import SteepestDescent as SteepestDescent

for _name, _cls in [("cg", CG), ("bicgstab", BiCGSTAB), ("gmres", GMRES), ("jacobi", Jacobi),
                    ("sor", SOR), ("richardson", Richardson),
                    ("steepest_descent", SteepestDescent)]:
    register_solver(_cls, _name)
del _name, _cls

__version__ = "0.1.0"

__all__ = [
    "CG",
    "GMRES",
    "SOR",
    "BiCGSTAB",
    "BlockSolveResult",
    "Cotangents",
    "DenseOperator",
    "DiffusionStencil",
    "FunctionOperator",
    "IterativeSolver",
    "Jacobi",
    "LaplacianStencil",
    "LinearOperator",
    "MatrixFreeError",
    "PRDPController",
    "Richardson",
    "ScipyLinearOperator",
    "SolveResult",
    "SolverError",
    "SparseOperator",
    "Status",
    "SteepestDescent",
    "aslinearoperator",
    "available_solvers",
    "get_solver",
    "gradient_fidelity",
    "register_solver",
    "solve",
    "solve_vjp",
]
