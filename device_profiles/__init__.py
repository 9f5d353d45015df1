"""Pure: where the built-in device profiles (one TOML per device class) live.

The files are package data; ``agent.profiles`` loads and validates them.
"""

from __future__ import annotations

from pathlib import Path

PROFILE_DIR = Path(__file__).parent


def profile_path(name: str) -> Path:
    """Path of the built-in profile file for a device class.

    Args:
        name: device class, e.g. ``"jetson-nano"``.

    Returns:
        ``PROFILE_DIR / f"{name}.toml"`` (the file may not exist; callers check).
    """
    return PROFILE_DIR / f"{name}.toml"
