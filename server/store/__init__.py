"""Prediction store: SQLAlchemy tables and migrations, the spooling writer, API keys, feedback.

SQLite (a file) is the embedded default, PostgreSQL the production database;
both run the same migrations and the same idempotent inserts.
"""

from server.store.keys import ApiKey, KeyStore
from server.store.writer import PredictionStore

__all__ = ["ApiKey", "KeyStore", "PredictionStore"]
