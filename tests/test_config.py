"""Settings: each value checked alone (finite, bounded), and the ones that must fit together checked together."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ConfigError, Settings, check_relationships, load_settings

FLOAT_SETTINGS = [name for name, field in Settings.model_fields.items() if field.annotation is float]
INTEGER_SETTINGS = [name for name, field in Settings.model_fields.items() if field.annotation is int]


def test_there_are_float_settings_to_check():
    assert {"request_timeout_s", "memory_high_water", "max_wait_ms"} <= set(FLOAT_SETTINGS)


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_no_float_setting_accepts_a_non_finite_value(monkeypatch, name, value):
    monkeypatch.setenv(name.upper(), value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == f"invalid configuration: {name.upper()}={value!r}: Input should be a finite number"


@pytest.mark.parametrize("name", ["request_timeout_s", "header_timeout_s", "drain_timeout_s", "key_cache_ttl_s"])
def test_durations_beyond_a_day_are_refused(name):
    with pytest.raises(ConfigError, match=rf"^invalid configuration: {name.upper()}='1e12': must be at most 86400"):
        load_settings(**{name: "1e12"})
    assert getattr(load_settings(**{name: "86400"}), name) == 86400


@pytest.mark.parametrize("name", INTEGER_SETTINGS)
def test_no_integer_setting_accepts_a_value_json_cannot_carry(monkeypatch, name):
    """SPOOL_MAX_BYTES=1e20 written out was accepted and made every /health answer 500 (orjson stops at 64 bits)."""
    monkeypatch.setenv(name.upper(), str(10**20))
    with pytest.raises(ConfigError, match=rf"^invalid configuration: {name.upper()}='100000000000000000000': "):
        load_settings()


def test_the_largest_integer_settings_are_served_by_health_and_info(make_settings):
    settings = make_settings(spool_max_bytes=2**53, max_batch_tokens=2**53)
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["database"]["spool_limit_bytes"] == 2**53
        assert client.get("/info").status_code == 200


@pytest.mark.parametrize("name", ["MODEL_PATH", "SPOOL_DIR"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_directory_setting_is_refused_not_taken_as_the_current_directory(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == (f"invalid configuration: {name}={value!r}: is empty: unset it for the default, or "
                                "give a directory")


def test_max_request_bytes_fits_grpcs_message_limit():
    """2**31 or more started with GRPC_PORT set and crashed with an OverflowError traceback (grpc takes a C int)."""
    assert load_settings(max_request_bytes=2**31 - 1).max_request_bytes == 2**31 - 1
    with pytest.raises(ConfigError, match="MAX_REQUEST_BYTES"):
        load_settings(max_request_bytes=2**31)


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_log_file_is_unset(value):
    assert load_settings(log_file=value).log_file is None


def test_log_backups_is_bounded():
    """Each rotation renames every backup in turn: a billion made the first one last for hours."""
    assert load_settings(log_backups=1000).log_backups == 1000
    with pytest.raises(ConfigError, match="LOG_BACKUPS"):
        load_settings(log_backups=1001)


def test_max_wait_ms_is_bounded_in_milliseconds():
    assert load_settings(max_wait_ms="60000").max_wait_ms == 60000
    with pytest.raises(ConfigError, match="MAX_WAIT_MS"):
        load_settings(max_wait_ms="1e9")


def test_a_queue_that_cannot_hold_one_request_is_refused_naming_both_variables():
    settings = load_settings(max_queue=64, max_texts_per_request=128)  # each valid alone
    with pytest.raises(ConfigError) as error:
        check_relationships(settings)
    assert "MAX_QUEUE=64" in str(error.value) and "MAX_TEXTS_PER_REQUEST=128" in str(error.value)
    check_relationships(load_settings(max_queue=128, max_texts_per_request=128))
    check_relationships(load_settings())  # the defaults fit together


def test_requests_larger_than_the_default_queue_are_fine_when_the_queue_is_derived(make_settings):
    """Unset, MAX_QUEUE is derived from the memory limit and never below MAX_TEXTS_PER_REQUEST: the check refused
    MAX_TEXTS_PER_REQUEST=3000 alone, naming a MAX_QUEUE no one had set (red team helper-85)."""
    from server.metrics import Metrics
    from server.runtime import load_checked

    settings = make_settings(max_texts_per_request=3000)
    check_relationships(settings)
    assert load_checked(settings, Metrics(), warm=False).settings.max_queue >= 3000


def test_max_wait_ms_at_or_past_the_request_deadline_is_refused_naming_both():
    with pytest.raises(ConfigError) as error:
        check_relationships(load_settings(max_wait_ms=10_000, request_timeout_s=5))
    assert "MAX_WAIT_MS=10000.0" in str(error.value) and "REQUEST_TIMEOUT_S=5.0" in str(error.value)
    with pytest.raises(ConfigError):
        check_relationships(load_settings(max_wait_ms=5000, request_timeout_s=5))
    check_relationships(load_settings(max_wait_ms=4999, request_timeout_s=5))


def test_water_marks_must_be_ordered():
    with pytest.raises(ConfigError, match="MEMORY_LOW_WATER=0.9.*MEMORY_HIGH_WATER=0.8"):
        load_settings(memory_low_water=0.9, memory_high_water=0.8)
