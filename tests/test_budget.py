"""TokenBudget (halving after OOM, slow recovery, memory-pressure halving, the exported gauge) and the memory plan
(budgets derived from the limit) with fake limits and cost models."""

from __future__ import annotations

import math
import re

import pytest

from server.budget import Area, MemoryDoesNotFit, MemoryPlan, TokenBudget, plan_memory, queued_text_bytes
from server.config import Settings
from server.exitcodes import ExitCode
from server.memory_model import CostModel
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



# --- the memory plan: budgets derived from the limit (server.budget.plan_memory), with fake limits and models ---

MIB = 1 << 20
MODEL = CostModel(per_token=10_000, per_token_length=100)  # a token at 512: 61,200 bytes; one 512-token text ~30 MiB
MAX_LENGTH = 512


def host(limit_mib: float, base_mib: float = 200, high: float = 0.85) -> Area:
    return Area("the memory limit", int(limit_mib * MIB), int(base_mib * MIB), high)


def plan_for(limit_mib: float, settings: Settings | None = None, model: CostModel = MODEL, **kwargs) -> MemoryPlan:
    return plan_memory(settings or Settings(), host(limit_mib), model, MAX_LENGTH, 2, **kwargs)


def test_a_derived_plan_peaks_under_high_water_and_its_batches_are_as_large_as_fit() -> None:
    plan = plan_for(1024)
    assert set(plan.derived) == {"max_batch_tokens", "engine_workers", "max_queue", "cache_max_bytes"}
    assert plan.engine_workers == 2
    token = MODEL.token_bytes(MAX_LENGTH)
    assert plan.host_peak <= plan.host.ceiling < plan.host_peak + plan.engine_workers * token  # one token more: over
    assert plan.batch_bytes == math.ceil(plan.batch_tokens * token)
    assert plan.host_peak == plan.host.base + plan.cache_max_bytes + plan.queue_bytes + 2 * plan.batch_bytes
    assert MAX_LENGTH * 2 < plan.batch_tokens < 8192  # several long texts, but less than the default allows


def test_with_room_to_spare_the_defaults_are_the_ceiling() -> None:
    plan = plan_for(64 * 1024)
    defaults = Settings()
    assert (plan.batch_tokens, plan.max_queue, plan.cache_max_bytes, plan.engine_workers) == (
        defaults.max_batch_tokens, defaults.max_queue, defaults.cache_max_bytes, 2)


def test_the_plan_shrinks_with_the_limit_queue_and_cache_too() -> None:
    plans = [plan_for(limit) for limit in (4096, 1024, 600)]
    assert [p.batch_tokens for p in plans] == sorted((p.batch_tokens for p in plans), reverse=True)
    assert plans[-1].max_queue < plans[0].max_queue and plans[-1].cache_max_bytes < plans[0].cache_max_bytes
    assert all(p.host_peak <= p.host.ceiling for p in plans)


def test_a_tight_limit_drops_to_one_worker_then_squeezes_queue_and_cache_before_giving_up() -> None:
    settings = Settings()
    one_text = MODEL.batch_bytes(1, MAX_LENGTH)
    minimum_queue = settings.max_texts_per_request * queued_text_bytes(settings, MAX_LENGTH)
    just_enough = (200 * MIB + minimum_queue + one_text) / 0.85 / MIB + 1
    plan = plan_for(just_enough)
    assert (plan.engine_workers, plan.cache_max_bytes, plan.max_queue) == (1, 0, settings.max_texts_per_request)
    assert plan.batch_tokens_at_peak // MAX_LENGTH == 1  # one max-length text at a time
    assert plan.host_peak <= plan.host.ceiling


def test_a_limit_that_cannot_hold_one_max_length_text_names_the_limit_it_needs() -> None:
    with pytest.raises(MemoryDoesNotFit) as failure:
        plan_for(250)
    message = str(failure.value)
    assert failure.value.exit_code == ExitCode.CONFIG and "\n" not in message
    assert "cannot hold one text of 512 tokens" in message and "MEMORY_HIGH_WATER=0.85" in message
    needed = int(re.search(r"at least (\d+) MiB", message).group(1))
    assert f"--memory {needed}m" in message
    assert plan_for(needed).host_peak <= plan_for(needed).host.ceiling  # the limit it names is enough
    with pytest.raises(MemoryDoesNotFit):
        plan_for(needed - 2)  # and not much more than enough


def test_settings_the_user_set_are_kept_when_they_fit() -> None:
    settings = Settings(max_batch_tokens=1024, engine_workers=1, max_queue=300, cache_max_bytes=1 << 20)
    plan = plan_for(1024, settings)
    assert (plan.batch_tokens, plan.engine_workers, plan.max_queue, plan.cache_max_bytes) == (1024, 1, 300, 1 << 20)
    assert plan.derived == ()
    applied = plan.apply(Settings())
    assert (applied.max_batch_tokens, applied.engine_workers, applied.max_queue, applied.cache_max_bytes) == (
        1024, 1, 300, 1 << 20)


def test_a_setting_that_cannot_fit_stops_start_up_naming_it_and_the_limit_it_needs() -> None:
    settings = Settings(max_batch_tokens=8192)
    with pytest.raises(MemoryDoesNotFit) as failure:
        plan_for(1024, settings)
    message = str(failure.value)
    assert "with MAX_BATCH_TOKENS as set" in message and "MAX_BATCH_TOKENS=8192" in message
    assert "lower MAX_BATCH_TOKENS or leave it unset" in message
    needed = int(re.search(r"at least (\d+) MiB", message).group(1))
    assert plan_for(needed, settings).batch_tokens == 8192  # at the named limit it starts, as set


def test_engine_workers_zero_set_explicitly_still_means_derived() -> None:
    assert "engine_workers" in plan_for(1024, Settings(engine_workers=0)).derived


def test_a_disabled_cache_takes_nothing() -> None:
    assert plan_for(1024, Settings(enable_model_caching=False)).cache_max_bytes == 0


def test_the_costliest_batch_is_capped_by_batch_size_and_a_lone_long_text_still_counts() -> None:
    assert plan_for(64 * 1024, Settings(max_batch_size=4)).batch_tokens_at_peak == 4 * MAX_LENGTH
    assert plan_for(1024, Settings(max_batch_tokens=64)).batch_tokens_at_peak == MAX_LENGTH


def test_on_a_gpu_the_batches_are_planned_in_its_memory() -> None:
    gpu = Area("GPU 0's memory", 2048 * MIB, 500 * MIB, 0.85)
    plan = plan_for(600, device=gpu)
    assert plan.host_peak == plan.host.base + plan.cache_max_bytes + plan.queue_bytes  # no batches in host memory
    assert plan.device_peak == gpu.base + plan.engine_workers * plan.batch_bytes <= gpu.ceiling
    with pytest.raises(MemoryDoesNotFit, match=r"GPU 0's memory .* set CUDA_MEM_LIMIT to at least \d+") as failure:
        plan_for(600, Settings(max_batch_tokens=16384, max_batch_size=64, max_queue=512), device=gpu)
    assert "lower MAX_BATCH_TOKENS or leave" in str(failure.value)
    assert "MAX_QUEUE" not in str(failure.value)  # a host setting: no help on the GPU


def test_a_budget_carries_its_plan() -> None:
    plan = plan_for(1024)
    budget = TokenBudget(plan.batch_tokens, Metrics(), plan=plan)
    assert budget.plan is plan and budget.current == plan.batch_tokens
