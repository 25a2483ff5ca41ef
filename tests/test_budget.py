"""TokenBudget: halving after OOM, slow recovery, memory-pressure halving, the exported gauge."""

from __future__ import annotations

import pytest

from server.budget import TokenBudget
from server.metrics import Metrics


def gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("sentiment_batch_token_budget")


def test_starts_at_base_and_exports_it() -> None:
    metrics = Metrics()
    budget = TokenBudget(8192, metrics)
    assert budget.current == 8192
    assert gauge(metrics) == 8192


def test_oom_halves_below_the_failed_batch_but_not_below_min() -> None:
    metrics = Metrics()
    budget = TokenBudget(8192, metrics, min_tokens=256)
    budget.reduce_after_oom(8192)
    assert budget.current == 4096
    budget.reduce_after_oom(1000)  # a smaller batch failed: go below it
    assert budget.current == 500
    budget.reduce_after_oom(4096)  # a larger one (a single long text) says nothing about the budget
    assert budget.current == 500
    budget.reduce_after_oom(500)
    assert budget.current == 256  # 250 clamped to min
    budget.reduce_after_oom(256)
    assert budget.current == 256
    assert gauge(metrics) == 256


def test_min_never_exceeds_base() -> None:
    budget = TokenBudget(32, Metrics(), min_tokens=64)
    budget.reduce_after_oom(32)
    assert budget.current == 32


@pytest.mark.parametrize("bad", [0, -5])
def test_rejects_a_base_below_one(bad: int) -> None:
    with pytest.raises(ValueError, match="base_tokens"):
        TokenBudget(bad, Metrics())


def test_recovers_a_tenth_of_base_after_a_run_of_successes_up_to_base() -> None:
    metrics = Metrics()
    budget = TokenBudget(1000, metrics, min_tokens=10, recover_after=5)
    budget.reduce_after_oom(1000)
    assert budget.current == 500
    for _ in range(4):
        budget.record_success()
    assert budget.current == 500  # not yet
    budget.record_success()
    assert budget.current == 600
    assert gauge(metrics) == 600
    for _ in range(100):
        budget.record_success()
    assert budget.current == 1000  # capped at base


def test_an_oom_restarts_the_success_run() -> None:
    budget = TokenBudget(1000, Metrics(), min_tokens=10, recover_after=5)
    budget.reduce_after_oom(1000)
    for _ in range(4):
        budget.record_success()
    budget.reduce_after_oom(500)  # 500 -> 250
    for _ in range(4):
        budget.record_success()
    assert budget.current == 250
    budget.record_success()
    assert budget.current == 350


def test_memory_pressure_halves_the_effective_budget_while_on() -> None:
    metrics = Metrics()
    budget = TokenBudget(8192, metrics, min_tokens=64)
    budget.set_memory_pressure(True)
    assert budget.memory_pressure
    assert budget.current == 4096
    assert gauge(metrics) == 4096
    budget.reduce_after_oom(8192)  # both: OOM limit 4096, halved again
    assert budget.current == 2048
    budget.set_memory_pressure(False)
    assert budget.current == 4096
    assert gauge(metrics) == 4096


def test_pressure_respects_the_minimum() -> None:
    budget = TokenBudget(100, Metrics(), min_tokens=64)
    budget.set_memory_pressure(True)
    assert budget.current == 64

