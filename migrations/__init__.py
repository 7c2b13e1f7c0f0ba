"""Alembic migrations of the task table; `llmos db upgrade` (or `alembic upgrade head`) applies them."""
