"""Alembic migration scripts, shipped inside the package so `editor db upgrade` finds them after a
plain `pip install .`. `editor.db.migrate` configures Alembic to use this directory."""
