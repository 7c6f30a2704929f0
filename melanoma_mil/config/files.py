"""YAML files a command reads (config files, sweep files): refused in one line when they are no
file, have a key twice or do not parse, with the fix (the repository's file of that path, the
folder's file of the closest name)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (as OmegaConf does for
    config files), rather than silently keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )  # fmt: skip
            seen.append(key)
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """YAML ``text`` as Python values, a key repeated within a mapping being an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader


def yaml_problem(e: Exception) -> str:
    """A YAML parse error in one line: what is wrong and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _in_clone(file: str | Path) -> Path | None:
    """The repository's own file at a relative path (`configs/...`, `sweeps/...`), when one
    exists: the README's commands give these from the clone's root, and a user runs them from
    a cohort's folder."""
    clone = Path(__file__).resolve().parents[2] / file
    return clone if not Path(file).is_absolute() and clone.is_file() else None


def yaml_file_problem(path: str | Path, what: str, flag: str = "") -> str | None:
    """Why ``path`` is no YAML file to read (None when it is a file): a folder (`sweep sweeps/`,
    named with its YAML files), a device or FIFO, or nothing there, then with the repository's
    file of that path (a README command run from a cohort's folder). ``flag``: how the path is
    given, e.g. "--config "."""
    file = Path(path)
    if file.is_file():
        return None
    if file.is_dir():
        names = sorted(p.name for p in file.glob("*.yaml"))[:5]
        fix = f"name one of its files {names}" if names else "give the path of a YAML file"
        return f"{what} '{file}' is a folder, not a YAML file: {fix}."
    if file.exists():
        return f"{what} '{file}' is not a regular file: give the path of a YAML file."
    clone = _in_clone(path)
    if clone is not None:
        return f"{what} '{file}' not found in {Path.cwd()}: the repository's is {flag}{clone}"
    return f"{what} '{file}' not found: {_nearest_yaml(file, flag)}"


def _nearest_yaml(file: Path, flag: str) -> str:
    """The fix for a YAML path not found: its folder's file of the closest name, else the
    folder's YAML files, else the folder that is missing."""
    folder = file.parent
    if not folder.is_dir():
        return f"check the {flag}path (there is no folder '{folder}')."
    names = sorted(p.name for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(file.name, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {flag}{folder / close[0]}?"
    if names:
        return f"{folder} holds {names[:5]}: name one of them."
    return f"check the {flag}path ({folder} holds no YAML file)."
