"""Running the Alembic migrations from code (`crypto-client migrate`, `serve`, the tests)."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from crypto_client.db.engine import create_engine

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _alembic_ini() -> Path:
    # A wheel carries the migrations inside the package; a checkout has them at its root.
    for candidate in (_PACKAGE_DIR / "alembic.ini", _PACKAGE_DIR.parent.parent / "alembic.ini"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("alembic.ini not found next to the package or the checkout")


def alembic_config(url: str) -> Config:
    ini = _alembic_ini()
    config = Config(str(ini))
    config.set_main_option("script_location", str(ini.parent / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configured_logging"] = True
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url`. Blocking: call it from a thread inside an event loop."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    """The schema revision this version of the code needs."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


async def schema_problem(url: str) -> str | None:
    """None when the database at `url` is at this version's revision, else what to do."""
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            try:
                current = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            except DBAPIError:
                current = None
    finally:
        await engine.dispose()
    head = head_revision()
    if current == head:
        return None
    if current is None:
        return "it is not migrated yet: run `crypto-client migrate`"
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()}
    if current in known:
        return f"its schema is at revision {current}, this version needs {head}: run `crypto-client migrate`"
    return (
        f"its schema is at revision {current}, which this version does not know"
        " (a newer crypto-client migrated it)"
    )
