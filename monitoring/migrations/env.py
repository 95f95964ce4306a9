"""Alembic environment for the noisewise store: migrations run on the connection that ``noisewise.monitoring.store``
passes in ``config.attributes["connection"]`` (there is no alembic.ini: the store URL comes from
NOISEWISE_STORE_URL or NOISEWISE_HOME)."""

from alembic import context

from noisewise.monitoring.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
context.run_migrations()
