"""Alembic environment: always online, on the connection ``server.store.migrate`` passes in."""

from alembic import context

from server.store.tables import Base

if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported: run `sentiment-analyzer db upgrade`")

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
