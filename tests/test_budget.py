"""TokenBudget (halving after OOM, slow recovery, memory-pressure halving, the exported gauge) and the memory plan
(budgets derived from the limit) with fake limits and cost models."""

from __future__ import annotations

import math
import re

import pytest

from server.budget import (
    BODY_COST_PER_BYTE,
    BODY_MOST_REQUESTS,
    BODY_SHARE,
    TEXT_WORK_BYTES,
    Area,
    BodyBudget,
    MemoryDoesNotFit,
    MemoryPlan,
    TokenBudget,
    plan_memory,
    queued_text_bytes,
)
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
    assert plan.bodies_peak == plan.body_bytes * BODY_COST_PER_BYTE
    assert plan.host_peak == (plan.host.base + plan.cache_max_bytes + plan.bodies_peak + TEXT_WORK_BYTES
                              + plan.queue_bytes + 2 * plan.batch_bytes)
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
    one_body = settings.max_request_bytes * BODY_COST_PER_BYTE
    just_enough = (200 * MIB + one_body + TEXT_WORK_BYTES + minimum_queue + one_text) / 0.85 / MIB + 1
    plan = plan_for(just_enough)
    assert (plan.engine_workers, plan.cache_max_bytes, plan.max_queue) == (1, 0, settings.max_texts_per_request)
    assert plan.body_bytes == settings.max_request_bytes  # one body of the largest size, no more
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
        plan_for(needed - 1)  # and the least that is


def test_settings_the_user_set_are_kept_when_they_fit() -> None:
    settings = Settings(max_batch_tokens=1024, engine_workers=1, max_queue=300, cache_max_bytes=1 << 20)
    plan = plan_for(1024, settings)
    assert (plan.batch_tokens, plan.engine_workers, plan.max_queue, plan.cache_max_bytes) == (1024, 1, 300, 1 << 20)
    assert plan.derived == ()
    applied = plan.apply(Settings())
    assert (applied.max_batch_tokens, applied.engine_workers, applied.max_queue, applied.cache_max_bytes) == (
        1024, 1, 300, 1 << 20)


def test_a_setting_that_cannot_fit_stops_start_up_naming_it_and_the_limit_it_needs() -> None:
    settings = Settings(max_batch_tokens=16384)  # 32 texts of 512 tokens: 1 GB
    with pytest.raises(MemoryDoesNotFit) as failure:
        plan_for(1024, settings)
    message = str(failure.value)
    assert "with MAX_BATCH_TOKENS as set" in message and "MAX_BATCH_TOKENS=16384" in message
    assert "lower MAX_BATCH_TOKENS or leave it unset" in message
    needed = int(re.search(r"at least (\d+) MiB", message).group(1))
    assert plan_for(needed, settings).batch_tokens == 16384  # at the named limit it starts, as set
    with pytest.raises(MemoryDoesNotFit):  # the least that is enough, though the derived parts grow with it
        plan_for(needed - 1, settings)


def test_a_large_batch_as_set_leaves_one_derived_worker_rather_than_not_fitting() -> None:
    plan = plan_for(1024, Settings(max_batch_tokens=8192))  # two such batches at once would not fit
    assert (plan.engine_workers, plan.batch_tokens) == (1, 8192)
    assert plan.host_peak <= plan.host.ceiling


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
    assert plan.host_peak == (plan.host.base + plan.cache_max_bytes + plan.bodies_peak + TEXT_WORK_BYTES
                              + plan.queue_bytes)  # no batches
    assert plan.device_peak == gpu.base + plan.engine_workers * plan.batch_bytes <= gpu.ceiling
    with pytest.raises(MemoryDoesNotFit, match=r"GPU 0's memory .* set CUDA_MEM_LIMIT to at least \d+") as failure:
        plan_for(600, Settings(max_batch_tokens=16384, max_batch_size=64, engine_workers=2, max_queue=512), device=gpu)
    assert "lower MAX_BATCH_TOKENS / ENGINE_WORKERS or leave" in str(failure.value)
    assert "MAX_QUEUE" not in str(failure.value)  # a host setting: no help on the GPU


def test_a_budget_carries_its_plan() -> None:
    plan = plan_for(1024)
    budget = TokenBudget(plan.batch_tokens, Metrics(), plan=plan)
    assert budget.plan is plan and budget.current == plan.batch_tokens


# --- the token budget as a function of the batch's padded width ---

WIDTHS = (8, 32, 64, 128, 200, 256, 384, 511, 512)


def test_a_derived_budget_holds_at_each_width_the_tokens_that_cost_what_the_planned_batch_costs() -> None:
    plan = plan_for(1024)
    planned_bytes = plan.batch_tokens * MODEL.token_bytes(MAX_LENGTH)
    tokens = [plan.batch_tokens_at(width) for width in WIDTHS]
    for width, budget in zip(WIDTHS, tokens, strict=True):
        assert budget * MODEL.token_bytes(width) <= planned_bytes < (budget + 1) * MODEL.token_bytes(width)
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] == plan.batch_tokens
    assert tokens[3] > 2 * plan.batch_tokens  # at 128 tokens a token costs 36 % of one at 512


def test_a_lowered_budget_scales_to_each_width_in_the_same_proportion() -> None:
    plan = plan_for(1024)
    half = plan.batch_tokens // 2
    for width in WIDTHS:
        assert plan.batch_tokens_at(width, half) * MODEL.token_bytes(width) <= half * MODEL.token_bytes(MAX_LENGTH)
        assert plan.batch_tokens_at(width, half) <= plan.batch_tokens_at(width)


def test_max_batch_tokens_as_set_is_also_a_flat_cap_at_every_width() -> None:
    plan = plan_for(1024, Settings(max_batch_tokens=2048))
    assert [plan.batch_tokens_at(width) for width in WIDTHS] == [2048] * len(WIDTHS)
    lowered = [plan.batch_tokens_at(width, 512) for width in WIDTHS]  # after an OOM: scaled, still capped
    assert lowered[-1] == 512 and 512 < lowered[2] <= 2048 and lowered[0] == 2048


def test_without_a_cost_model_the_budget_is_the_same_at_every_width() -> None:
    plan = plan_for(1024, model=CostModel(0.0, 0.0))
    assert {plan.batch_tokens_at(width) for width in WIDTHS} == {plan.batch_tokens}


def test_the_width_budget_follows_oom_and_pressure() -> None:
    plan = plan_for(1024)
    metrics = Metrics()
    budget = TokenBudget(plan.batch_tokens, metrics, min_tokens=64, plan=plan)
    assert [budget.at(width) for width in WIDTHS] == [plan.batch_tokens_at(width) for width in WIDTHS]
    failed = budget.at(128)  # a full batch of 128-token texts ran out of memory
    budget.reduce_after_oom(failed, 128)
    assert failed // 2 - 2 <= budget.at(128) <= failed // 2 + 2  # half of it at its width (rounding aside)
    assert budget.current == pytest.approx(plan.batch_tokens / 2, abs=2)  # and half as much at every width
    assert gauge(metrics) == budget.current
    lowered = budget.at(64)
    budget.set_memory_pressure(True)
    assert budget.at(64) == pytest.approx(lowered / 2, abs=2)


def test_without_a_plan_the_width_budget_is_the_flat_one() -> None:
    budget = TokenBudget(1000, Metrics(), min_tokens=10)
    budget.reduce_after_oom(1000, 128)
    assert [budget.at(width) for width in WIDTHS] == [500] * len(WIDTHS)


# --- request bodies in flight ---

def test_bodies_in_flight_get_a_share_of_the_room_and_at_least_one_of_the_largest_size() -> None:
    plan = plan_for(1024)
    room = plan.host.ceiling - plan.host.base
    assert plan.body_bytes == int(BODY_SHARE * room) // BODY_COST_PER_BYTE > Settings().max_request_bytes
    assert plan_for(64 * 1024).body_bytes == BODY_MOST_REQUESTS * Settings().max_request_bytes  # and no more
    large = plan_for(1024, Settings(max_request_bytes=16 * MIB))
    assert large.body_bytes == 16 * MIB and large.host_peak <= large.host.ceiling  # the batches made room
    assert large.batch_tokens < plan.batch_tokens
    with pytest.raises(MemoryDoesNotFit, match=r"request bodies of 64 MiB in flight 1,024 MiB parsed \(MAX_REQUEST_"):
        plan_for(1024, Settings(max_request_bytes=64 * MIB))


def test_the_body_budget_refuses_what_would_pass_its_limit_and_holds_nothing_then() -> None:
    bodies = BodyBudget(100)
    assert bodies.reserve(60) and bodies.reserve(40) and bodies.held == 100
    assert not bodies.reserve(1) and bodies.held == 100
    bodies.release(60)
    assert bodies.reserve(50) and bodies.held == 90
    bodies.limit = 10  # a reload planned less: nothing new until enough is answered
    assert not bodies.reserve(1)
    assert bodies.reserve(0)  # but a request without a body is not refused
    assert BodyBudget().reserve(1 << 40)  # no plan yet: nothing refused


def test_the_tokenizers_part_covers_the_text_thread_and_the_event_loop_at_once():
    """The text thread tokenizes ENCODE_CHARS_AT_ONCE characters at a time while the loop may tokenize a request
    of up to LOOP_TEXT_CHARS: TEXT_WORK_BYTES charges the larger twice, so the loop's must not be the larger."""
    from server.predictor import LOOP_TEXT_CHARS
    from server.tokenizer import ENCODE_CHARS_AT_ONCE, TOKENIZER_PEAK_PER_CHAR

    assert LOOP_TEXT_CHARS <= ENCODE_CHARS_AT_ONCE
    assert TEXT_WORK_BYTES >= (LOOP_TEXT_CHARS + ENCODE_CHARS_AT_ONCE) * TOKENIZER_PEAK_PER_CHAR
    plan = plan_for(1024)
    assert plan.describe()["tokenizer_bytes"] == TEXT_WORK_BYTES
