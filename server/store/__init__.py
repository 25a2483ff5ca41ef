"""Prediction store: a write-ahead log on local disk in front of the database, API keys, feedback.

SQLite (a file) is the embedded default, PostgreSQL the production database; both run the same
migrations and the same idempotent inserts. See ``prediction_store`` for how the pieces fit.
"""

from server.store.keys import ApiKey, KeyStore
from server.store.prediction_store import PredictionStore
from server.store.spooldir import SpoolLocked
from server.store.wal import RecordsTooLarge, SpoolUnavailable

__all__ = ["ApiKey", "KeyStore", "PredictionStore", "RecordsTooLarge", "SpoolLocked", "SpoolUnavailable"]
