"""Higher input resolution at equal cost: the EViT paper's second result.

Fewer tokens per block buy time; spending that time on a larger input (more
tokens at the start) can give more accuracy for the cost of the unpatched model
at its native size. This module makes that one step:

* :func:`evit.resolution.set_input_size` resizes a ViT in place, position embeddings
  resampled by its host library itself;
* :func:`budget_from` turns "as costly as the native model", "G GMACs" or "S
  times cheaper" into a MAC budget;
* :func:`solve_keep_rate` finds the largest keep rate whose real
  :func:`evit.count_macs` at the new size stays within the budget.

The budget is in MACs, counted on a real forward (:mod:`evit.cost`), never
estimated: a budget met on paper but exceeded by the model would defeat the
comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
from torch import nn

from . import hosts
from .cost import check_input_size, count_macs
from .patch import apply, patch, reductions, token_counts, unpatch
from .reduction import TokenReduction
from .resolution import Size, set_input_size, spatial


def _native_macs(model: nn.Module) -> int:
    """MACs of ``model`` unpatched at its current size; an existing patch is put back afterwards."""
    saved = reductions(model)
    unpatch(model)
    try:
        return count_macs(model)
    finally:
        if saved:
            apply(model, saved)


def budget_from(
    model: nn.Module,
    match_macs: bool = False,
    macs: Optional[float] = None,
    speedup: Optional[float] = None,
) -> int:
    """A MAC budget (integer MACs per image) from exactly one of:

    * ``match_macs``: the cost of ``model`` unpatched at its native size (the paper's
      comparison: a resized, token-reducing model that costs what the original did);
    * ``macs``: a cost in GMACs (``4.6`` means 4.6e9 MACs);
    * ``speedup``: the native cost divided by ``speedup``. This is a MAC-ratio proxy for
      speed: measured speed-ups are smaller, as the work that does not scale with the token
      count (and the reduction itself) is not free; ``evit bench`` measures the real ratio.

    Call it before :func:`set_input_size`: "native" is the size the model takes now.
    """
    given = [match_macs is True, macs is not None, speedup is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one budget: match_macs=True, macs=GMACs or speedup=S")
    if macs is not None:
        if not macs > 0 or not math.isfinite(macs):
            raise ValueError(f"macs is a budget in GMACs and must be positive, got {macs}")
        return int(macs * 1e9)
    if speedup is not None and (not speedup > 0 or not math.isfinite(speedup)):
        raise ValueError(f"speedup must be a positive number, got {speedup}")
    native = _native_macs(model)
    return native if match_macs else int(native / speedup)


def candidate_rates(n_image_tokens: int) -> np.ndarray:
    """Every keep rate at which some token count changes, ascending, ending in 1.0.

    A block given ``n`` image tokens keeps ``ceil(r * n)``, which is constant for ``r`` in
    ``((k-1)/n, k/n]``. Later blocks see at most ``n`` image tokens (kept ones plus one fused),
    so every step of the cost ends at some ``k/m`` with ``1 <= k <= m <= n``: the cost is
    constant between consecutive entries of this list, and each entry is the largest rate of
    its step. Searching these finds the exact largest rate, not one within a tolerance.
    """
    if n_image_tokens < 1:
        raise ValueError(f"need at least one image token, got {n_image_tokens}")
    m = np.arange(1, n_image_tokens + 1)
    den = np.repeat(m, m)
    num = np.arange(len(den)) - np.repeat(np.cumsum(m) - m, m) + 1
    return np.unique(num / den)


@dataclass
class Solution:
    """A solved keep rate, its MACs, and how many MAC counts (forwards) the search took."""

    keep_rate: float
    macs: int
    evaluations: int


def _search(cost: Callable[[float], int], key: Callable[[float], tuple], rates: np.ndarray, budget: float,
            tol: float) -> tuple[int, int]:
    """Index and cost of the largest ``rates[i]`` with ``cost <= budget``, given ``cost(rates[0]) <=
    budget < cost(rates[-1])`` and ``cost`` non-decreasing.

    ``key(rate)`` (the token counts, free to compute) decides the cost, so each end of the bracket
    is first slid over the rates that share its key: only rates with other token counts are left
    to count. Guesses interpolate the cost linearly between the ends (Illinois variant, so an
    end that keeps being retained cannot stall it), with a bisection after any guess that did not
    halve the bracket, so the number of counts stays within about twice bisection's.
    """

    def slide(start: int, stop: int) -> int:
        # last index from ``start`` towards ``stop`` (exclusive) whose key equals start's: keys are
        # monotone in the rate, so the rates sharing a key are contiguous and bisection finds the edge
        k = key(float(rates[start]))
        a, b = start, stop  # invariant: key(rates[a]) == k; rates[b] has another key (or b is the bound)
        while abs(b - a) > 1:
            mid = (a + b) // 2
            if key(float(rates[mid])) == k:
                a = mid
            else:
                b = mid
        return a

    lo, hi = 0, len(rates) - 1
    g_lo, g_hi = cost(float(rates[lo])) - budget, cost(float(rates[hi])) - budget
    retained, bisect = 0, False
    while True:
        lo, hi = slide(lo, hi), slide(hi, lo)
        if hi - lo <= 1 or rates[hi] - rates[lo] <= tol:
            return lo, cost(float(rates[lo]))
        if bisect:
            i = (lo + hi) // 2
        else:
            target = rates[lo] - g_lo * (rates[hi] - rates[lo]) / (g_hi - g_lo)
            i = int(np.searchsorted(rates, target, side="right")) - 1
        i = min(max(i, lo + 1), hi - 1)
        width = hi - lo
        g = cost(float(rates[i])) - budget
        if g <= 0:
            lo, g_lo = i, g
            g_hi, retained = (g_hi / 2, -1) if retained == -1 else (g_hi, -1)
        else:
            hi, g_hi = i, g
            g_lo, retained = (g_lo / 2, 1) if retained == 1 else (g_lo, 1)
        bisect = not bisect and (hi - lo) * 2 > width


def solve(
    model: nn.Module,
    budget_macs: float,
    input_size: Optional[Size] = None,
    locations: Optional[Sequence[int]] = None,
    tol: float = 0.0,
    fuse: bool = True,
    method: Union[str, Callable[..., TokenReduction]] = "evit",
) -> Solution:
    """:func:`solve_keep_rate`, with the chosen rate's MACs and the number of MAC counts it took."""
    host = hosts.adapter(model)
    if not budget_macs > 0:
        raise ValueError(f"budget_macs must be positive, got {budget_macs}")
    channels, *size = host.input_size
    hw = tuple(size) if input_size is None else spatial(input_size, "input_size")
    full = (channels, *hw)
    check_input_size(host, full)
    n_image = host.num_tokens(hw) - host.num_prefix_tokens
    saved = reductions(model)
    counted: dict[tuple, int] = {}

    def key(rate: float) -> tuple:
        patch(model, rate, locations, fuse=fuse, method=method)
        return tuple(token_counts(model, n_image + host.num_prefix_tokens))

    def cost(rate: float) -> int:
        k = key(rate)  # leaves the model patched at ``rate``
        if k not in counted:
            counted[k] = count_macs(model, full)
        return counted[k]

    try:
        rates = candidate_rates(n_image)
        top = cost(1.0)
        if top <= budget_macs:
            return Solution(1.0, top, len(counted))
        least = cost(float(rates[0]))
        if least > budget_macs:
            raise ValueError(
                f"no keep rate fits a budget of {budget_macs / 1e9:.4g} GMACs at {hw[0]}x{hw[1]}: even keeping one "
                f"image token per reducing block costs {least / 1e9:.4g} GMACs (keep 1.0: {top / 1e9:.4g}); "
                "use a smaller input size or a larger budget"
            )
        i, macs = _search(cost, key, rates, budget_macs, tol)
        return Solution(float(rates[i]), macs, len(counted))
    finally:
        apply(model, saved) if saved else unpatch(model)


def solve_keep_rate(model: nn.Module, budget_macs: float, *args, **kwargs) -> float:
    """The largest keep rate, one for all ``locations``, at which ``model`` patched with ``method``
    costs at most ``budget_macs`` MACs per image of ``input_size`` (default: the size the model
    takes now; resize it with :func:`set_input_size` first).

    Every cost is :func:`evit.count_macs` of the patched model, so the budget is never exceeded.
    MACs rise with the keep rate in steps (token counts are ``ceil(rate * n)``); the search runs
    over the rates where the steps end (:func:`candidate_rates`), so the answer is exact: any
    larger rate costs more than the budget. ``tol > 0`` stops the search once the bracket is that
    narrow (fewer counts, a rate at most ``tol`` below the largest). Returns 1.0 when the model
    fits unreduced. Raises ValueError, naming the least reachable cost, when even one kept token
    per reducing block is over budget. Any patch ``model`` carried is restored afterwards.
    Takes the arguments of :func:`solve` (input_size, locations, tol, fuse, method).
    """
    return solve(model, budget_macs, *args, **kwargs).keep_rate


@dataclass
class BudgetChoice:
    """What ``evit bench``/``eval`` print when they fit a model to a budget."""

    img_size: tuple[int, int]
    native_size: tuple[int, int]
    native_gmacs: float
    budget_gmacs: Optional[float]
    keep_rate: Optional[float]
    gmacs: float

    def describe(self) -> str:
        size = f"{self.img_size[0]}x{self.img_size[1]}"
        native = f"{self.native_size[0]}x{self.native_size[1]}"
        if self.keep_rate is None:
            return f"input {size} (native {native}: {self.native_gmacs:.4f} GMACs unpatched)"
        return (f"input {size}: keep rate {self.keep_rate:.4f} costs {self.gmacs:.4f} GMACs, within the budget of "
                f"{self.budget_gmacs:.4f} GMACs (native {native} unpatched: {self.native_gmacs:.4f} GMACs)")


def fit(
    models: Iterable[nn.Module],
    img_size: Optional[int] = None,
    locations: Optional[Sequence[int]] = None,
    match_macs: bool = False,
    macs: Optional[float] = None,
    speedup: Optional[float] = None,
) -> Optional[BudgetChoice]:
    """The command line's step: resize every model (same architecture) to ``img_size`` and, when a
    budget is given, choose the keep rate on the first. None when neither is asked for."""
    models = list(models)
    has_budget = match_macs or macs is not None or speedup is not None
    if not models or (img_size is None and not has_budget):
        return None
    first = models[0]
    native_size = tuple(hosts.adapter(first).input_size[1:])
    budget = budget_from(first, match_macs, macs, speedup) if has_budget else None
    native = budget if match_macs else _native_macs(first)
    for m in models:
        if img_size is not None:
            set_input_size(m, img_size)
    hw = tuple(hosts.adapter(first).input_size[1:])
    if budget is None:
        return BudgetChoice(hw, native_size, native / 1e9, None, None, _native_macs(first) / 1e9)
    found = solve(first, budget, hw, locations)
    return BudgetChoice(hw, native_size, native / 1e9, budget / 1e9, found.keep_rate, found.macs / 1e9)
