"""Allocation: within budget, one format per fused group, at (or within one upgrade of) the optimum."""

from __future__ import annotations

import itertools
import random

import pytest

from modelpress.errors import UserError
from modelpress.fit.allocate import allocate, ends_high, smallest_bytes, uniform
from modelpress.fit.sensitivity import LinearSensitivity, Sensitivity

FORMATS = {"int2": 2.25, "int3": 3.25, "int4": 4.25, "int8": 8.0, "keep": 16.0}


def _random(rng: random.Random, n_groups: int) -> Sensitivity:
    linears = {}
    for g in range(n_groups):
        members = rng.choice([1, 2, 3])
        for m in range(members):
            numel = rng.choice([64, 256, 1024])
            scale = rng.lognormvariate(0, 1.5)
            errors = {f: 0.0 if f == "keep" else scale * numel * 4.0 ** -b * rng.uniform(0.7, 1.3) for f, b in FORMATS.items()}
            nbytes = {f: int(numel * b / 8) for f, b in FORMATS.items()}
            if rng.random() < 0.2:  # a width some group size does not divide
                del errors["int3"], nbytes["int3"]
            linears[f"l{g}.{m}"] = LinearSensitivity(layer=g // 3, group=f"l{g}.0", in_features=64, numel=numel,
                                                     energy=scale * numel, errors=errors, nbytes=nbytes)
    return Sensitivity("random", "rtn", list(FORMATS), linears, fixed_bytes=100)


def _optimum(sens: Sensitivity, budget: float) -> float:
    groups = sens.groups()
    options = [[f for f in FORMATS if all(f in sens.linears[n].nbytes for n in names)] for names in groups.values()]
    best = float("inf")
    for pick in itertools.product(*options):
        choice = {n: f for f, names in zip(pick, groups.values()) for n in names}
        if sens.bytes_of(choice) <= budget:
            best = min(best, sens.error_of(choice))
    return best


def test_allocation_is_optimal_or_within_one_upgrade():
    rng = random.Random(0)
    exact = 0
    for trial in range(150):
        sens = _random(rng, rng.randint(2, 6))
        lo, hi = smallest_bytes(sens), sens.bytes_of({n: "keep" for n in sens.linears})
        budget = rng.uniform(lo, hi)
        choice = allocate(sens, budget)
        assert sens.bytes_of(choice) <= budget
        for names in sens.groups().values():
            assert len({choice[n] for n in names}) == 1  # a fused group shares one format
        best = _optimum(sens, budget)
        got = sens.error_of(choice)
        spread = max(sum(sens.linears[n].errors["int2"] for n in names) for names in sens.groups().values())
        assert got <= best + spread + 1e-9
        exact += got <= best * (1 + 1e-9) + 1e-12
    assert exact >= 0.8 * 150


def test_mixed_beats_the_uniform_and_the_ends_heuristic_at_their_own_size():
    rng = random.Random(1)
    for _ in range(30):
        sens = _random(rng, 24)
        for base in ("int2", "int4"):
            for heuristic in (uniform(sens, base), ends_high(sens, base, "int8", sens.bytes_of(uniform(sens, base)) * 1.3)):
                if heuristic is None:
                    continue
                budget = sens.bytes_of(heuristic)
                assert sens.error_of(allocate(sens, budget)) <= sens.error_of(heuristic) + 1e-12


def test_a_budget_below_the_smallest_allocation_is_refused():
    sens = _random(random.Random(2), 4)
    with pytest.raises(UserError, match="smallest allocation"):
        allocate(sens, smallest_bytes(sens) - 1)
    assert sens.bytes_of(allocate(sens, smallest_bytes(sens))) == smallest_bytes(sens)


def test_relative_objective_does_not_favour_large_outputs_by_scale_alone():
    """``a`` has 1000x the output scale of ``b`` but loses less of it to int4: the output
    objective spends the bytes on ``a``, the relative one on ``b``."""
    def lin(group, scale, rel4):
        return LinearSensitivity(0, group, 64, 64, scale, {"int4": scale * rel4, "int8": scale * 1e-4},
                                 {"int4": 32, "int8": 64})
    sens = Sensitivity("m", "rtn", ["int4", "int8"], {"a": lin("a", 1000.0, 0.01), "b": lin("b", 1.0, 0.05)},
                       fixed_bytes=0)
    assert allocate(sens, 96, "output") == {"a": "int8", "b": "int4"}
    assert allocate(sens, 96, "relative") == {"a": "int4", "b": "int8"}
