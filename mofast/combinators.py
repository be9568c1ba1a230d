"""Combinators: from k per-objective losses and the Gram matrix of their raw gradients to the
coefficients c of the update direction d = sum_i c_i g_i (SPEC section 2).

    comb = make_combinator("mgda-decoupled", k=4)
    c = comb.weights(losses, gram)   # losses [k], gram [k, k] = <g_i, g_j>; c [k]

Every combinator reads the same Gram matrix of the raw gradients. A variant that solves the
min-norm problem on rescaled gradients s_i g_i rescales the Gram matrix to S G S with
S = diag(s) instead of taking a second pass over the gradients. The returned c always
applies to the raw gradients.

Nothing here waits on the host: no `.item()`, no Python branch on a tensor value, so the
trainer can queue a whole step without a synchronisation. The k x k work runs in float64
(it is tiny, and dividing by a loss or a gradient norm near the guard epsilon would
overflow float32); c comes back in the Gram matrix's dtype, on its device.

Where the weights sum to one: `uniform`, `groupdro`, `mgda` and `mgda-decoupled` return
weights on the simplex. `mgda-normalised` returns c_i = c'_i / ||g_i|| exactly as the SPEC
states, without renormalising: then d = sum_i c'_i u_i is the min-norm point of the unit
gradients, whose length is at most 1. Renormalising c to sum 1 instead scales d by the
harmonic-like factor 1 / sum_j (c'_j / ||g_j||), which collapses as soon as one gradient
vanishes; on the toy problem of SPEC section 3 that stalls the method on the unit circle
just as plain `mgda` stalls (measured with `mofast toy`), against the SPEC's expectation.

A solved objective (zero loss and zero gradient) gives finite weights: the guarded
divisions use max(x, eps), the rescaled gradient of the solved objective is the zero
vector, the min-norm problem puts its weight there and d = 0. That is MGDA's answer at a
Pareto-stationary point, not a NaN.
"""

import abc
import math
import numbers

import torch

from mofast import kernels

__all__ = [
    "COMBINATORS",
    "Combinator",
    "GroupDRO",
    "MGDA",
    "MGDADecoupled",
    "MGDANormalised",
    "Uniform",
    "make_combinator",
]

SOLVER_METHODS = ("frank-wolfe", "exact")

# The k x k work is done in this dtype whatever the Gram matrix's dtype (see the module doc).
_WORK_DTYPE = torch.float64


def _check_number(name: str, value: object) -> None:
    # math.isfinite on a string or None raises a TypeError that names no option.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")


class Combinator(abc.ABC):
    """Chooses c [k] from the losses [k] and the Gram matrix [k, k] of the raw gradients.

    Subclasses implement `_weights(losses, gram)` on validated float64 inputs; the state
    they carry (if any) goes through `state_dict` / `load_state_dict` for checkpoints.
    """

    name = ""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (the number of objectives) must be a positive int, got {k!r}")
        self.k = k

    def weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Coefficients c [k] for the raw gradients, in gram's dtype, on gram's device."""
        self._check_inputs(losses, gram)

        with torch.no_grad():
            c = self._weights(losses.detach().to(_WORK_DTYPE), gram.detach().to(_WORK_DTYPE))
        return c.to(gram.dtype)

    @abc.abstractmethod
    def _weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """c [k] in float64 from float64 losses [k] and gram [k, k] on one device."""

    def state_dict(self) -> dict:
        return {"name": self.name, "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"a combinator state must be a dict, got {type(state).__name__}")
        if state.get("name") != self.name:
            raise ValueError(
                f"state of combinator {state.get('name')!r} cannot load into {self.name!r}"
            )
        if state.get("k") != self.k:
            raise ValueError(f"state for k = {state.get('k')!r} cannot load into k = {self.k}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"

    def _check_inputs(self, losses: torch.Tensor, gram: torch.Tensor) -> None:
        for label, tensor in (("losses", losses), ("gram", gram)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(f"{label} must be a floating-point tensor, got {tensor.dtype}")
        if tuple(losses.shape) != (self.k,):
            raise ValueError(
                f"losses must have shape ({self.k},) for k = {self.k}, got {tuple(losses.shape)}"
            )
        if tuple(gram.shape) != (self.k, self.k):
            raise ValueError(
                f"gram must have shape ({self.k}, {self.k}) for k = {self.k}, "
                f"got {tuple(gram.shape)}"
            )
        if losses.device != gram.device:
            raise ValueError(
                f"losses and gram must be on one device, got {losses.device} and {gram.device}"
            )


class Uniform(Combinator):
    """c_i = 1/k."""

    name = "uniform"

    def _weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        return torch.full_like(losses, 1.0 / self.k)


class GroupDRO(Combinator):
    """Exponentiated-gradient ascent on the objective weights.

    Each call first updates c^(t+1)_i proportional to c^(t)_i exp(eta L_i) from c^(0) = 1/k,
    then returns c^(t+1): the step that sees the losses already uses the new weights.
    The update is a log-softmax on log-weights, so a loss of any size cannot overflow.
    A call with a non-finite loss returns NaN weights (the trainer sees the fault) and
    leaves the state as it was, so one bad step does not poison every later one.
    """

    name = "groupdro"

    def __init__(self, k: int, eta: float = 0.1):
        super().__init__(k)
        _check_number("eta (the groupdro step size)", eta)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta (the groupdro step size) must be finite and >= 0, got {eta}")
        self.eta = float(eta)
        self._log_weights = torch.full((k,), -math.log(k), dtype=_WORK_DTYPE)

    def _weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        if self._log_weights.device != losses.device:
            # Once, on the first call: non_blocking, so the move does not wait for the GPU.
            self._log_weights = self._log_weights.to(losses.device, non_blocking=True)

        updated = torch.log_softmax(self._log_weights + self.eta * losses, dim=0)

        # torch.where on a 0-d flag keeps the decision on the device.
        finite = torch.isfinite(updated).all()
        self._log_weights = torch.where(finite, updated, self._log_weights)
        return updated.exp()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_weights": self._log_weights.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        log_weights = state.get("log_weights")
        if not isinstance(log_weights, torch.Tensor) or tuple(log_weights.shape) != (self.k,):
            shape = tuple(log_weights.shape) if isinstance(log_weights, torch.Tensor) else None
            raise ValueError(
                f"groupdro state needs 'log_weights' of shape ({self.k},), got {shape}"
            )
        self._log_weights = log_weights.detach().to(
            device=self._log_weights.device, dtype=_WORK_DTYPE, copy=True
        )

    def __repr__(self) -> str:
        return f"GroupDRO(k={self.k}, eta={self.eta})"


class MGDA(Combinator):
    """c = argmin over the simplex of ||sum_i c_i g_i||^2, solved by mofast.kernels.min_norm."""

    name = "mgda"

    def __init__(
        self,
        k: int,
        max_iters: int = 20,
        tol: float = 1e-8,
        method: str = "frank-wolfe",
        eps: float = 1e-12,
    ):
        super().__init__(k)
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
            raise ValueError(f"max_iters must be an int >= 0, got {max_iters!r}")
        _check_number("tol", tol)
        _check_number("eps (the division guard)", eps)
        if not math.isfinite(tol) or tol < 0:
            raise ValueError(f"tol must be finite and >= 0, got {tol}")
        if method not in SOLVER_METHODS:
            raise ValueError(f"unknown min-norm method {method!r}; choose one of {SOLVER_METHODS}")
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps (the division guard) must be finite and > 0, got {eps}")
        self.max_iters = max_iters
        self.tol = float(tol)
        self.method = method
        self.eps = float(eps)

    def _weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        return self._solve(gram)

    def _solve(self, gram: torch.Tensor) -> torch.Tensor:
        return kernels.min_norm(gram, max_iters=self.max_iters, tol=self.tol, method=self.method)

    def _solve_rescaled(self, gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Min-norm weights of the gradients scale_i g_i, from the Gram matrix of the g_i."""
        return self._solve(gram * scale[:, None] * scale[None, :])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.k}, max_iters={self.max_iters}, tol={self.tol}, "
            f"method={self.method!r}, eps={self.eps})"
        )


class MGDANormalised(MGDA):
    """Min-norm weights c' of u_i = g_i / ||g_i||, returned as c_i = c'_i / ||g_i||.

    Not renormalised to sum 1: see the module doc for why.
    """

    name = "mgda-normalised"

    def _weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        # A sum of squares cannot be negative, but a Gram matrix assembled from shards in
        # another precision may round a zero diagonal just below 0; sqrt would give NaN.
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        scale = 1.0 / norms.clamp_min(self.eps)
        return self._solve_rescaled(gram, scale) * scale


class MGDADecoupled(MGDA):
    """Min-norm weights of g_i / L_i, applied to the raw g_i (they sum to 1).

    Losses are taken as non-negative, as DPO losses are; a loss at or below eps counts as
    solved and is divided by eps instead. A non-finite loss gives NaN weights, as groupdro's
    does, so the trainer sees the fault.
    """

    name = "mgda-decoupled"

    def _weights(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        # 1 / inf = 0 would turn a diverged objective into a zero gradient, where the
        # min-norm point would put all the weight; NaN carries the fault to c instead.
        scale = 1.0 / losses.clamp_min(self.eps)
        scale = torch.where(torch.isfinite(losses), scale, float("nan"))
        return self._solve_rescaled(gram, scale)


COMBINATORS: dict[str, type[Combinator]] = {
    cls.name: cls for cls in (Uniform, GroupDRO, MGDA, MGDANormalised, MGDADecoupled)
}


def make_combinator(
    name: str,
    k: int,
    *,
    eta: float = 0.1,
    max_iters: int = 20,
    tol: float = 1e-8,
    method: str = "frank-wolfe",
    eps: float = 1e-12,
) -> Combinator:
    """The combinator called `name` for k objectives.

    Every option may be given whatever the name, so a trainer can pass its whole
    configuration; each combinator takes the ones it uses: eta (groupdro's step size),
    max_iters / tol / method (the min-norm solver of the mgda family) and eps (the guard
    on divisions by a gradient norm or a loss in mgda-normalised and mgda-decoupled).
    """
    if name not in COMBINATORS:
        raise ValueError(f"unknown combinator {name!r}; choose one of {sorted(COMBINATORS)}")
    cls = COMBINATORS[name]

    if issubclass(cls, MGDA):
        return cls(k, max_iters=max_iters, tol=tol, method=method, eps=eps)
    if cls is GroupDRO:
        return cls(k, eta=eta)
    return cls(k)
