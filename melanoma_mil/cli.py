"""`python -m melanoma_mil CMD [--config FILE ...] [key=value ...]`.

Commands are registered with their config schema and a lazily imported runner, so `--help` and
config errors answer in well under a second (torch is imported only when work starts).
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from melanoma_mil import config as C
from melanoma_mil.console import configure_output, quiet_libraries
from melanoma_mil.errors import UserError


@dataclass(frozen=True)
class Command:
    schema: type
    runner: str  # "module:function"; the function takes the config and returns an exit code
    summary: str
    positional: str | None = None  # config key that receives positional arguments
    positional_many: bool = False
    resume: str = ""  # what to do after an interruption (Ctrl-C, a kill)
    locks: bool = False  # its processes take turns in output_dir with file locks (flock)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        C.DemoConfig,
        "melanoma_mil.demo.run:run_demo",
        "synthetic cohort -> tile -> extract -> fit -> heatmaps -> evaluate, end to end",
        resume="re-run the same command: it resumes, keeping what the demo made",
        locks=True,
    ),
    "tile": Command(
        C.TileConfig,
        "melanoma_mil.tiling.run:run_tile",
        "tissue detection and a tile grid at a target resolution (mpp)",
        resume="re-run the same command: it resumes, keeping the slides already tiled",
    ),
    "extract": Command(
        C.ExtractConfig,
        "melanoma_mil.features.run:run_extract",
        "encode tiles into cached feature bags (h5, resumable)",
        resume="re-run the same command: it resumes, keeping the slides already encoded",
    ),
    "fit": Command(
        C.FitConfig,
        "melanoma_mil.training.cv:run_fit",
        "patient-level cross-validation of a MIL model on cached bags",
        resume="re-run the same command: it resumes at the first unfinished fold",
        locks=True,
    ),
    "sweep": Command(
        C.SweepConfig,
        "melanoma_mil.evaluation.sweep:run_sweep",
        "run a W&B sweep file locally (each run a fit)",
        resume="re-run the same command: it resumes, keeping the finished runs",
        positional="sweep_file",
        locks=True,
    ),
    "compare": Command(
        C.CompareConfig,
        "melanoma_mil.evaluation.compare:run_compare",
        "paired comparison table + figure of fit runs on the same splits",
        positional="run_dirs",
        positional_many=True,
    ),
    "heatmap": Command(
        C.HeatmapConfig,
        "melanoma_mil.inference.heatmap:run_heatmap",
        "attention heatmaps and top/bottom tile montages of a trained run",
        resume="re-run the same command: it resumes, skipping the slides already drawn",
    ),
    "predict": Command(
        C.PredictConfig,
        "melanoma_mil.inference.predict:run_predict",
        "run a trained fold-model ensemble on new slides",
        resume="re-run the same command: it resumes, reusing the tiles and features made in "
        "_work and, without overwrite=true, the slides already drawn",
    ),
    "evaluate": Command(
        C.EvaluateConfig,
        "melanoma_mil.evaluation.evaluate:run_evaluate",
        "metrics with CIs, calibration, survival of predicted groups, report.html",
        positional="predictions",
    ),
}

USAGE = "usage: python -m melanoma_mil CMD [--config FILE ...] [--print-config] [key=value ...]"


# key=value: a dotted key (a leading + as Hydra writes it), not a path such as runs/lr=1
_OVERRIDE = re.compile(r"\+?[A-Za-z_][A-Za-z0-9_]*(\.[^=/\\]+)*=")  # data.label_map.in-situ=


def _top_help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<9} {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "`python -m melanoma_mil CMD --help` lists a command's keys and defaults."]
    return "\n".join(lines)


def _command_help(name: str, cmd: Command) -> str:
    pos = ""
    if cmd.positional:
        pos = f" {cmd.positional.upper()}{' ...' if cmd.positional_many else ''}"
    doc = (cmd.schema.__doc__ or "").strip()
    lines = [
        f"usage: python -m melanoma_mil {name}{pos} [--config FILE ...] [key=value ...]",
        "",
        doc,
        "",
        "keys (default):",
    ]
    lines += [f"  {key} = {default}  ({typ})" for key, typ, default in C.describe(cmd.schema)]
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[str, Any, bool]:
    """Return (command, typed config, print_config) or raise UserError / SystemExit for help."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        raise SystemExit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown command '{name}'.{hint} Commands: {', '.join(COMMANDS)}.")
    cmd = COMMANDS[name]
    files: list[str] = []
    dotlist: list[str] = []
    positional: list[str] = []
    print_config = False
    it = iter(rest)
    for arg in it:
        if arg in ("-h", "--help"):
            print(_command_help(name, cmd))
            raise SystemExit(0)
        if arg == "--print-config":
            print_config = True
        elif arg in ("--config", "-c"):
            value = next(it, None)
            if value is None:
                raise UserError("--config needs a file path.")
            files.append(value)
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--count" and name == "sweep":  # `sweep FILE --count N`, as in wandb agent
            value = next(it, None)
            if value is None or value.startswith("--") or "=" in value:
                raise UserError("--count needs a number of runs: sweep SWEEP.yaml --count N.")
            dotlist.append(f"count={value}")
        elif arg.startswith("--"):
            key = arg[2:]
            if "=" in key:  # wandb agents may pass --key=value
                dotlist.append(key)
            else:
                raise UserError(f"unknown option '{arg}'. Options: --config FILE, --print-config.")
        # an existing file or folder (lr=1) is a path too
        elif "=" in arg and (
            not cmd.positional or _OVERRIDE.match(arg) and not os.path.exists(arg)
        ):
            dotlist.append(arg)
        elif cmd.positional:  # also a path holding '=' (runs/lr=1): no key has a '/'
            positional.append(arg)
        else:
            raise UserError(f"unexpected argument '{arg}': overrides are key=value.")
    cfg = C.load_config(cmd.schema, files, dotlist)
    if positional:  # set after parsing so paths with commas or brackets stay intact
        if not cmd.positional_many and len(positional) > 1:
            raise UserError(f"'{name}' takes one {cmd.positional}, got {positional}.")
        setattr(cfg, cmd.positional, positional if cmd.positional_many else positional[0])
    return name, cfg, print_config


# A disk that is full, read-only or not ours fails writes anywhere; the fix is the user's.
DISK_ERRORS = {
    errno.ENOSPC: "free space there or choose another output_dir",
    errno.EDQUOT: "free space in your quota or choose another output_dir",
    errno.EROFS: "the disk is read-only: choose another output_dir",
    errno.EACCES: "fix the permissions or choose another path",
    errno.EPERM: "fix the permissions or choose another path",
}


def _disk_error(e: OSError, output_dir: str | None) -> str:
    """One line: what failed, where, and the fix (h5py's own message spans several lines)."""
    if e.filename:
        where = f" ('{e.filename}')"
    else:
        where = f" (writing under '{output_dir}')" if output_dir else ""
    return f"{os.strerror(e.errno or 0)}{where}; {DISK_ERRORS[e.errno or 0]}."


def _printable(text: str) -> str:
    """``text`` on one line: a control character (a newline in a file name) or a Unicode line
    break (NEL, U+2028, U+2029: lines to ``str.splitlines`` and many terminals and log viewers)
    is written as its escape, so an error stays the one `error:` line scripts and users read."""
    return re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


def main(argv: list[str] | None = None) -> int:
    configure_output()
    output_dir: str | None = None
    name = ""
    try:
        name, cfg, print_config = parse(sys.argv[1:] if argv is None else argv)
        if print_config:
            print(C.to_yaml(cfg), end="")
            return 0
        from melanoma_mil.io import check_writable

        output_dir = cfg.output_dir
        # every command has one: refuse it before any work
        check_writable(output_dir, locks=COMMANDS[name].locks)
        module, func = COMMANDS[name].runner.split(":")
        runner = getattr(importlib.import_module(module), func)
        quiet_libraries()  # after the import: Lightning resets its log level when imported
        return int(runner(cfg) or 0)
    except UserError as e:
        print(f"error: {_printable(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `--help | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.errno not in DISK_ERRORS:  # anything else is a bug: keep its traceback
            raise
        print(f"error: {_printable(_disk_error(e, output_dir))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = COMMANDS[name].resume if name in COMMANDS else ""
        print(f"interrupted{': ' + resume if resume else ''}.", file=sys.stderr)
        return 130
