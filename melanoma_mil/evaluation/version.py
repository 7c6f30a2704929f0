"""The code version an evaluation records: the package version, and `git describe` of the
package's own checkout (never of a user's repository that happens to hold the package)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import melanoma_mil

_NAME = re.compile(r"""^name\s*=\s*["']melanoma-mil["']""", re.MULTILINE)


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def own_checkout(root: Path) -> bool:
    """Whether ``root`` (the folder above the package) is the top of melanoma-mil's own git
    repository: it holds a pyproject.toml naming melanoma-mil and is git's top level."""
    try:
        named = bool(_NAME.search((root / "pyproject.toml").read_text()))
    except (OSError, UnicodeDecodeError):
        return False
    top = _git(root, "rev-parse", "--show-toplevel")
    return named and bool(top) and Path(top).resolve() == root.resolve()


def code_version(package_dir: Path | None = None) -> str:
    """'melanoma-mil X.Y.Z', plus ' (git <describe --always --dirty>)' when the package
    (``package_dir``, default: this one) runs from its own checkout."""
    root = (package_dir or Path(melanoma_mil.__file__).parent).resolve().parent
    described = _git(root, "describe", "--always", "--dirty") if own_checkout(root) else ""
    return f"melanoma-mil {melanoma_mil.__version__}" + (f" (git {described})" if described else "")
