"""`editor serve` and `editor db ...` (registered on the main `editor` command group)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from editor.cli_options import quantize_option
from editor.settings import Settings

if TYPE_CHECKING:
    from editor.db.migrate import Step

# Alembic, SQLAlchemy, torch and Litestar are imported inside the commands: `editor --help` and
# `editor fill` should not wait for them.


def _settings(**overrides: Any) -> Settings:
    """Settings from the environment and .env, with command-line options on top."""
    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**values)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise click.ClickException(f"bad settings: {error}") from error


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _steps(steps: list[Step]) -> str:
    return ", ".join(str(step) for step in steps)


def prepare_database(settings: Settings, *, migrate_it: bool) -> str:
    """Upgrade the database to the newest schema (creating it if missing), or with
    `migrate_it=False` check that it is there already. Returns a line saying what happened."""
    from editor.db import migrate

    url = settings.database_url
    if not migrate_it:
        current, head = migrate.current_revision(url), migrate.head_revision(url)
        if current != head:
            raise click.ClickException(
                f"the database ({url}) is at revision {current or 'none (empty)'}, not {head}; "
                "run `editor db upgrade` first, or start without --no-migrate"
            )
        return f"Database {url} is at revision {head}."
    applied = migrate.upgrade(url)
    if not applied:
        return f"Database {url} is up to date (revision {migrate.head_revision(url)})."
    return f"Database {url}: applied {_steps(applied)}."


def _check_model(settings: Settings) -> None:
    """Fail fast when the bundled default model is missing, rather than serving 503s."""
    if settings.model is not None:
        return
    from editor.models.loading import bundled_path

    if not (bundled_path() / "config.json").is_file():
        raise click.ClickException(
            f"the bundled default model is missing ({bundled_path()}); pass --model DIR_OR_HF_ID or set EDITOR_MODEL"
        )


@click.command()
@click.option("--host", help="interface to listen on [default: 127.0.0.1; anything else needs EDITOR_API_TOKEN]")
@click.option("--port", type=int, help="port [default: 8000]")
@click.option("--model", help="model directory or Hugging Face id [default: the bundled model]")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps [default: auto]")
@click.option("--no-migrate", is_flag=True, help="do not upgrade the database; refuse to start if it is behind")
@quantize_option
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="run N model replicas on Ray Serve (one GPU each when the cluster has GPUs) [default: EDITOR_REPLICAS, "
    "else one model in this process, without Ray]",
)
@click.option(
    "--address", help="with --replicas: the Ray cluster to join [default: EDITOR_RAY_ADDRESS, else a local Ray]"
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    host: str | None,
    port: int | None,
    model: str | None,
    device: str | None,
    no_migrate: bool,
    quantize: str | None,
    replicas: int | None,
    address: str | None,
    log_level: str,
) -> None:
    """Start the editor and its REST API (one process, one model worker; with --replicas, the
    model runs in N Ray Serve replicas behind the same API).

    Settings come from EDITOR_* environment variables and a .env file; the options override them.
    The database is upgraded to the newest schema on start (created if missing).
    """
    import uvicorn

    from editor.server.app import create_app

    settings = _settings(
        host=host, port=port, model=model, device=device, quantize=quantize, replicas=replicas, ray_address=address
    )
    if address is not None and settings.replicas is None:
        raise click.UsageError("--address goes with --replicas (or EDITOR_REPLICAS)")
    try:
        settings.check_serving()
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    _check_model(settings)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # prepare_database says what it applied
    click.echo(prepare_database(settings, migrate_it=not no_migrate))
    if settings.replicas is not None:
        _join_ray(settings)
    app = create_app(settings)
    base = f"http://{_url_host(settings.host)}:{settings.port}"
    where = f"{settings.replicas} Ray Serve replica(s)" if settings.replicas is not None else "this process"
    click.echo(f"Model: {settings.model or 'bundled default'} in {where} (loading; {base}/ready says when)")
    click.echo(f"Editor:   {base}/")
    click.echo(f"API docs: {base}/schema")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )
    run_server(config, on_exit=app.state.worker.shut_down)


def _join_ray(settings: Settings) -> None:
    """Connect to Ray here, in the main thread before uvicorn starts. `ray.init` replaces the
    SIGTERM handler with one that exits at once; the previous one is put back, so SIGTERM shuts
    the server down gracefully as without Ray (the app's shutdown then stops the replicas)."""
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    try:
        from editor.ray_cluster import connect
    except ImportError as error:
        raise click.ClickException(f"--replicas needs Ray: pip install 'dllm-editor[ray]' ({error})") from error
    try:
        connect(settings.ray_address)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError or ValueError here
        where = settings.ray_address or "a local Ray instance"
        raise click.ClickException(f"cannot start or join {where}: {error}") from error
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_server(config: Any, *, on_exit: Callable[[], None]) -> None:
    """Run uvicorn; on SIGINT/SIGTERM call `on_exit` first. Uvicorn waits for open connections
    before the app's shutdown hook runs, so the worker must hear of the signal at once: it cancels
    running fills at their next step (their requests answer 503 and close) and refuses queued ones."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    GracefulServer(config).run()


@click.group()
@click.option("--database-url", help="SQLAlchemy URL [default: EDITOR_DATABASE_URL, else sqlite:///editor.db]")
@click.pass_context
def db(context: click.Context, database_url: str | None) -> None:
    """Database schema migrations."""
    context.obj = _settings(database_url=database_url).database_url


@db.command()
@click.option("--revision", default="head", show_default=True, help="target revision")
@click.pass_obj
def upgrade(url: str, revision: str) -> None:
    """Upgrade the database (creating it if missing) to a revision."""
    from editor.db import migrate

    try:
        applied = migrate.upgrade(url, revision)
    except migrate.MigrationError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"Applied {_steps(applied)}." if applied else f"Nothing to do: at {migrate.current_revision(url)}.")


@db.command()
@click.option("--revision", default="-1", show_default=True, help="target revision: -1 = one step, base = empty")
@click.pass_obj
def downgrade(url: str, revision: str) -> None:
    """Step the database schema back (revision -1 undoes the newest migration)."""
    from editor.db import migrate

    try:
        undone = migrate.downgrade(url, revision)
    except migrate.MigrationError as error:
        raise click.ClickException(str(error)) from error
    now = migrate.current_revision(url) or "base (empty)"
    click.echo(f"Undid {_steps(undone)}; now at {now}." if undone else f"Nothing to do: at {now}.")


@db.command()
@click.pass_obj
def current(url: str) -> None:
    """Show the database's revision and the newest one."""
    from editor.db import migrate

    now, head = migrate.current_revision(url), migrate.head_revision(url)
    state = "up to date" if now == head else "behind: run `editor db upgrade`"
    click.echo(f"{url}: at {now or 'none (empty)'}, newest is {head} ({state})")


@db.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_obj
def export_command(url: str, file: str) -> None:
    """Write every document, revision, batch job and record to FILE as JSON Lines (- for stdout).
    Safe on a live server: it reads one consistent snapshot. docs/operations.md."""
    from editor.db import backup, migrate
    from editor.db.engine import make_engine, make_session_factory

    schema = migrate.current_revision(url)
    if schema is None:
        raise click.ClickException(f"{url} has no tables: nothing to export (is the URL right?)")
    engine = make_engine(url)
    try:
        sessions = make_session_factory(engine)
        if file == "-":
            counts = backup.export(sessions, sys.stdout, schema=schema)
        else:
            counts = _export_to_file(Path(file), lambda out: backup.export(sessions, out, schema=schema))
    finally:
        engine.dispose()
    click.echo(f"Exported {counts} to {file}.", err=file == "-")


def _export_to_file(path: Path, write: Callable[[IO[str]], Any]) -> Any:
    """Write through a temporary file renamed into place, so FILE is never a partial backup."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            result = write(out)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


@db.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.pass_obj
def import_command(url: str, file: IO[str]) -> None:
    """Restore FILE (from `editor db export`) into an empty database, upgrading its schema first.
    One transaction: a bad line (named with its number) imports nothing. docs/operations.md."""
    from editor.db import backup, migrate
    from editor.db.engine import make_engine, make_session_factory

    try:
        migrate.upgrade(url)
    except migrate.MigrationError as error:
        raise click.ClickException(str(error)) from error
    engine = make_engine(url)
    try:
        counts = backup.import_(make_session_factory(engine), file)
    except backup.BackupError as error:
        raise click.ClickException(f"{file.name}: {error}; nothing was imported") from error
    finally:
        engine.dispose()
    click.echo(f"Imported {counts} into {url}.")


__all__ = ["db", "prepare_database", "serve"]
