"""Paths of the package's own assets, valid from any working directory."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ASSETS_PREFIX = "aropd/assets/"


def resolve(path: str) -> str:
    """``path`` as given, unless it names a packaged asset (``aropd/assets/...``) that is not
    there relative to the working directory: then the asset inside the installed package.

    Configs keep the short, readable ``aropd/assets/...`` form and still work when the command is
    started from another folder (or with aropd installed as a wheel).
    """
    normalized = path.replace("\\", "/")
    if normalized.startswith(ASSETS_PREFIX) and not Path(path).exists():
        packaged = PACKAGE / "assets" / normalized[len(ASSETS_PREFIX):]
        if packaged.exists():
            return str(packaged)
    return path
