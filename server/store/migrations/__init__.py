"""Alembic migrations of the prediction store, shipped inside the package (run by ``server.store.migrate``)."""
