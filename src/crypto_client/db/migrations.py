"""Running the Alembic migrations from code (`crypto-client migrate`, `serve`, the tests)."""

from pathlib import Path

from alembic import command
from alembic.config import Config

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
