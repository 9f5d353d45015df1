"""Pure: detecting which device profile we run on.

Detection (``detect_profile_name``) is a pure function of the text of
``/proc/device-tree/model`` and ``/etc/nv_tegra_release``. The IO edge is small and marked:
``read_detection_files`` reads the two system files, and ``detect_profile`` wires them to the
built-in profiles (``agent.profiles``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from agent.profiles import DeviceProfile, builtin_profiles

__all__ = [
    "DT_MODEL_FILE",
    "NVIDIA_DRIVER_FILE",
    "TEGRA_RELEASE_FILE",
    "detect_profile",
    "detect_profile_name",
    "parse_l4t_release",
    "read_detection_files",
]

DT_MODEL_FILE = "/proc/device-tree/model"
TEGRA_RELEASE_FILE = "/etc/nv_tegra_release"
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"

_L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?")
_BOARD_RE = re.compile(r"BOARD:\s*([A-Za-z0-9_-]+)")


def _clean(text: str | None) -> str | None:
    """Strip the NUL that ends device-tree strings, and whitespace; empty becomes ``None``."""
    if text is None:
        return None
    cleaned = text.replace("\x00", " ").strip()
    return cleaned or None


def parse_l4t_release(text: str) -> tuple[int, int, int] | None:
    """Pure: the L4T version in ``/etc/nv_tegra_release``.

    Args:
        text: file content, e.g. ``"# R36 (release), REVISION: 3.0, GCID: ..."``.

    Returns:
        ``(36, 3, 0)`` for that example; ``None`` when the text does not look like a release
        line.
    """
    m = _L4T_RE.search(text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _l4t_board(text: str) -> str | None:
    m = _BOARD_RE.search(text)
    return m.group(1) if m else None


def _match_model(model: str, profiles: Mapping[str, DeviceProfile]) -> tuple[str, str] | None:
    """The profile whose longest ``dt_model`` substring occurs in ``model`` (name, substring)."""
    best: tuple[int, str, str] | None = None
    lowered = model.lower()
    for name in sorted(profiles):
        for sub in profiles[name].match.dt_model:
            if sub and sub.lower() in lowered and (best is None or len(sub) > best[0]):
                best = (len(sub), name, sub)
    return None if best is None else (best[1], best[2])


def _from_release(release: tuple[int, int, int], board: str | None) -> tuple[str, str] | None:
    """Profile guessed from L4T version and board when the device-tree model is unreadable."""
    major = release[0]
    if board == "t210ref":  # Tegra X1: Nano (and TX1, same Maxwell CC 5.3)
        return "jetson-nano", "board t210ref is Tegra X1 (Jetson Nano class)"
    if major >= 34 or (board or "").startswith("t234"):
        # L4T R34+ (JetPack 5/6) runs on Xavier and Orin; R36 only on Orin. The Orin Nano
        # profile claims no DLA and the least memory, so it never promises absent hardware.
        return "jetson-orin-nano", f"L4T R{major} is Orin/Xavier era; smallest Orin profile"
    if board == "t186ref":  # R32 on Xavier (TX2 shares the board name but has no profile)
        return "jetson-xavier-nx", f"L4T R{major} board t186ref is the Xavier family"
    return None


def _detect(
    dt_model: str | None,
    tegra_release: str | None,
    has_cuda: bool,
    profiles: Mapping[str, DeviceProfile],
) -> tuple[str, str]:
    """Pure: (profile name, human reason)."""
    model = _clean(dt_model)
    release_text = _clean(tegra_release)
    if model is not None:
        hit = _match_model(model, profiles)
        if hit is not None:
            return hit[0], f"detected from {DT_MODEL_FILE}: {model!r}"
    release = parse_l4t_release(release_text) if release_text else None
    if release is not None and release_text is not None:
        board = _l4t_board(release_text)
        guess = _from_release(release, board)
        if guess is not None:
            what = "unreadable" if model is None else f"{model!r} unrecognised"
            return guess[0], (
                f"guessed from {TEGRA_RELEASE_FILE} (L4T R{release[0]}.{release[1]}.{release[2]}, "
                f"board {board!r}; {DT_MODEL_FILE} {what}): {guess[1]}; "
                "set the profile in config to override"
            )
    seen = f"{DT_MODEL_FILE}: {model!r}" if model else f"no {DT_MODEL_FILE}"
    seen += (
        f", {TEGRA_RELEASE_FILE}: {release_text!r}"
        if release_text
        else f", no {TEGRA_RELEASE_FILE}"
    )
    name = "x86-cuda" if has_cuda else "x86-cpu"
    gpu = "an NVIDIA GPU driver is present" if has_cuda else "no NVIDIA GPU driver"
    return name, f"no Jetson recognised ({seen}); {gpu}"


def detect_profile_name(
    dt_model: str | None,
    tegra_release: str | None,
    *,
    has_cuda: bool = False,
    profiles: Mapping[str, DeviceProfile] | None = None,
) -> str:
    """Pure: the device class for the contents of the two detection files.

    The device-tree model is matched against each profile's ``match.dt_model`` substrings
    (longest match wins, case-insensitive). Without a recognised model (a container masks
    ``/proc/device-tree``), the L4T release line decides: ``t210ref`` is a Nano, R34 and newer
    the smallest Orin profile, R32 ``t186ref`` the Xavier family. AGX Xavier maps to
    ``jetson-xavier-nx`` (same Volta GPU, CC 7.2, 2 DLA cores; less memory stated). With no
    Jetson information: ``"x86-cuda"`` if ``has_cuda`` else ``"x86-cpu"``.

    Args:
        dt_model: content of ``/proc/device-tree/model`` (may end in NUL), or ``None``.
        tegra_release: content of ``/etc/nv_tegra_release``, or ``None``.
        has_cuda: an NVIDIA GPU driver is present (used only when no Jetson is found).
        profiles: profiles to match against; ``None`` = the built-in ones (package data).

    Returns:
        A profile name.
    """
    table = builtin_profiles() if profiles is None else profiles
    return _detect(dt_model, tegra_release, has_cuda, table)[0]


# --- IO edge ------------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:  # missing or unreadable: detection treats both as "not there"
        return None


def read_detection_files(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """IO: read ``/proc/device-tree/model`` and ``/etc/nv_tegra_release`` under ``root``.

    Args:
        root: file-system root (a temporary directory in tests).

    Returns:
        ``(model, release)``, each ``None`` when missing or unreadable; NULs are kept.
    """
    return (
        _read_text(root / DT_MODEL_FILE.lstrip("/")),
        _read_text(root / TEGRA_RELEASE_FILE.lstrip("/")),
    )


def detect_profile(
    root: Path = Path("/"), has_cuda: bool | None = None
) -> tuple[str, DeviceProfile, str]:
    """IO: detect the device class of this machine.

    Args:
        root: file-system root (a temporary directory in tests).
        has_cuda: whether an NVIDIA GPU is present; ``None`` = look for the driver's
            ``/proc/driver/nvidia/version`` under ``root``.

    Returns:
        ``(name, profile, reason)``, the reason saying which file decided and what it said.

    Raises:
        ConfigError: a built-in profile does not validate (a packaging bug).
    """
    model, release = read_detection_files(root)
    if has_cuda is None:
        has_cuda = (root / NVIDIA_DRIVER_FILE.lstrip("/")).is_file()
    profiles = builtin_profiles()
    name, reason = _detect(model, release, has_cuda, profiles)
    return name, profiles[name], reason
