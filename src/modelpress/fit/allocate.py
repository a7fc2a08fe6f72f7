"""Allocation: one format per group of Linears, least summed error under a byte budget.

A multiple-choice knapsack: each group (Linears an engine fuses, :mod:`modelpress.fit.sensitivity`)
takes exactly one of the formats all its Linears can hold; the cost of a choice is its bytes,
its value the error it adds. Solved as the Lagrangian relaxation does (Shoham & Gersho, 1988):
each group's options are reduced to the lower convex hull of (bytes, error); starting from the
cheapest option everywhere, the upgrade with the largest error saved per byte is taken while it
fits, which walks every group along its hull exactly as sweeping the multiplier would. What the
relaxation leaves unspent (an upgrade that did not fit) is filled greedily with the best
single-group change that still fits. The gap to the exact optimum is at most one group's
upgrade, small against hundreds of groups.

Errors are compared in one of two scales (``objective``):

- ``"output"``: each Linear's output error as measured (mean squared error of its outputs on
  the calibration tokens);
- ``"relative"``: the same divided by the Linear's output energy (``||W x||^2``), so that a
  Linear with large outputs does not outweigh the others by its scale alone;
- ``"kl"``: the output error times the group's measured gain (KL at the model's output per unit
  of output error, :func:`modelpress.fit.sensitivity.probe_gains`): the predicted loss.

Example:
    >>> from modelpress.fit.sensitivity import LinearSensitivity, Sensitivity
    >>> s = Sensitivity("m", "rtn", ["int4", "int8"], {
    ...     "a": LinearSensitivity(0, "a", 8, 64, 1.0, {"int4": 4.0, "int8": 1.0}, {"int4": 32, "int8": 64}),
    ...     "b": LinearSensitivity(1, "b", 8, 64, 1.0, {"int4": 2.0, "int8": 1.9}, {"int4": 32, "int8": 64})},
    ...     fixed_bytes=0)
    >>> allocate(s, budget=96)
    {'a': 'int8', 'b': 'int4'}
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

from modelpress.errors import UserError
from modelpress.fit.sensitivity import Sensitivity

Objective = Literal["output", "relative", "kl"]


@dataclass(frozen=True)
class Option:
    format: str
    nbytes: int
    error: float


def group_options(sens: Sensitivity, objective: Objective = "output",
                  allowed: tuple[str, ...] | None = None) -> dict[str, list[Option]]:
    """Each group's formats (those every Linear of it can hold, among ``allowed``), cheapest first."""
    if objective == "kl" and not sens.probes:
        raise UserError("the kl objective needs measured gains (modelpress.fit.sensitivity.probe_gains)")
    out = {}
    for group, names in sens.groups().items():
        linears = [sens.linears[n] for n in names]
        specs = [f for f in sens.candidates if all(f in s.nbytes for s in linears) and (allowed is None or f in allowed)]
        if not specs:
            raise UserError(f"{group}: no candidate format fits all of {', '.join(names)}; add a format whose "
                            "group size divides their input width")
        out[group] = sorted((Option(f, sum(s.nbytes[f] for s in linears),
                                    (sens.gain(group, f) if objective == "kl" else 1.0)
                                    * sum(_scaled(s, f, objective) for s in linears)) for f in specs),
                            key=lambda o: (o.nbytes, o.error))
    return out


def _scaled(s, spec: str, objective: Objective) -> float:
    if objective == "relative" and not s.kl_measured:
        return s.errors[spec] / s.energy if s.energy > 0 else 0.0
    return s.errors[spec]


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error), cheapest first: the options a Lagrangian can pick."""
    pareto: list[Option] = []
    for o in options:  # sorted by bytes: keep those that lower the error
        if not pareto or o.error < pareto[-1].error:
            if pareto and o.nbytes == pareto[-1].nbytes:
                pareto.pop()
            pareto.append(o)
    hull: list[Option] = []
    for o in pareto:
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], o):
            hull.pop()  # hull[-1] lies above the chord: never the best at any multiplier
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    """Error saved per byte moving from ``a`` to the bigger ``b`` (negative: a saving)."""
    return (b.error - a.error) / (b.nbytes - a.nbytes)


def smallest_bytes(sens: Sensitivity, allowed: tuple[str, ...] | None = None) -> int:
    """The fewest bytes any allocation reaches (every group in its smallest format)."""
    return sens.fixed_bytes + sum(opts[0].nbytes for opts in group_options(sens, allowed=allowed).values())


def allocate(sens: Sensitivity, budget: float, objective: Objective = "output",
             allowed: tuple[str, ...] | None = None) -> dict[str, str]:
    """The format of every Linear: least summed error with total bytes (fixed ones included) at
    most ``budget``.

    Raises:
        UserError: not even the smallest allocation fits ``budget``.
    """
    options = group_options(sens, objective, allowed)
    hulls = {g: _hull(opts) for g, opts in options.items()}
    chosen = {g: 0 for g in hulls}  # index on the hull
    spent = sens.fixed_bytes + sum(h[0].nbytes for h in hulls.values())
    if spent > budget:
        raise UserError(f"the smallest allocation is {spent / 1e6:.1f} MB, above the budget of {budget / 1e6:.1f} MB")
    heap = [(_slope(h[0], h[1]), g) for g, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:  # the steepest saving per byte first: the Lagrangian path
        _, g = heapq.heappop(heap)
        h, i = hulls[g], chosen[g]
        step = h[i + 1].nbytes - h[i].nbytes
        if spent + step > budget:
            continue  # this group stops here; cheaper upgrades elsewhere may still fit
        chosen[g], spent = i + 1, spent + step
        if i + 2 < len(h):
            heapq.heappush(heap, (_slope(h[i + 1], h[i + 2]), g))
    picked = {g: hulls[g][i] for g, i in chosen.items()}
    spent = _fill(options, picked, spent, budget)
    groups = sens.groups()
    return {n: picked[g].format for g, names in groups.items() for n in names}


def _fill(options: dict[str, list[Option]], picked: dict[str, Option], spent: int, budget: float) -> int:
    """Spend what the hull walk left: repeatedly take the single-group change (any option, on the
    hull or not) that saves the most error and still fits."""
    while True:
        best = None
        for g, opts in options.items():
            cur = picked[g]
            for o in opts:
                if o.error < cur.error and spent - cur.nbytes + o.nbytes <= budget:
                    if best is None or cur.error - o.error > best[0]:
                        best = (cur.error - o.error, g, o)
        if best is None:
            return spent
        _, g, o = best
        spent += o.nbytes - picked[g].nbytes
        picked[g] = o


def uniform(sens: Sensitivity, spec: str) -> dict[str, str] | None:
    """Every Linear in ``spec``; ``None`` when some Linear cannot hold it."""
    if not all(spec in s.nbytes for s in sens.linears.values()):
        return None
    return {n: spec for n in sens.linears}


def ends_high(sens: Sensitivity, base: str, high: str, budget: float) -> dict[str, str] | None:
    """The common heuristic, for comparison: ``base`` everywhere, then whole layers taken alternately
    from the first and the last into ``high`` while the budget allows. ``None`` if ``base`` does
    not fit every Linear or does not fit the budget."""
    choice = uniform(sens, base)
    if choice is None or sens.bytes_of(choice) > budget:
        return None
    layers = sorted({s.layer for s in sens.linears.values() if not s.kl_measured})
    order = [layers[i // 2] if i % 2 == 0 else layers[-1 - i // 2] for i in range(len(layers))]
    for layer in order:
        trial = {n: (high if s.layer == layer and high in s.nbytes else choice[n]) for n, s in sens.linears.items()}
        if sens.bytes_of(trial) > budget:
            break
        choice = trial
    return choice
