"""Job lists of ``prospect train-many``: a JSON list of jobs, each ``{"images": ..., "out": ...}`` plus
any ``prospect train`` options, parsed exactly as the command line parses them and all checked before
any model loads (one bad job stops the list with ``<file> job <n>: <reason>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

MAX_BYTES = 4 << 20  # a job list is a few KB; refuse what only a mistake makes
MAX_JOBS = 10_000


class JobParser(argparse.ArgumentParser):
    """Reads one entry of a job list: errors are raised (and prefixed with the job), not printed with a usage."""

    def error(self, message):
        raise ValueError(message)


def read_jobs(path: Path, args: argparse.Namespace, add_options: Callable[[argparse.ArgumentParser], None]
              ) -> list[tuple[str, argparse.Namespace]]:
    """(name, namespace) per job of the list at ``path``: the command line's options ``args``, with the
    job's own keys instead; ``add_options`` adds the options a job may set (those of ``prospect train``)."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ValueError(f"job list {path} is too large ({size:,} bytes; at most {MAX_BYTES:,}): "
                             "split it into several lists")
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read job list {path}: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of jobs")
    if len(entries) > MAX_JOBS:
        raise ValueError(f"{path} lists too many jobs ({len(entries):,}; at most {MAX_JOBS:,}): split it into several lists")
    parser = JobParser(prog="job", add_help=False)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", required=True)
    add_options(parser)
    defaults = vars(parser.parse_args(["-", "--out", "-"]))  # every option a job may set, with its default
    jobs, outs = [], {}
    for number, entry in enumerate(entries, 1):
        name = f"{path} job {number}"
        try:
            job = parse_job(entry, args, parser, defaults)
            clash = outs.setdefault(Path(job.out).resolve(), number)
            if clash != number:
                raise ValueError(f"writes {job.out}, as job {clash} does")
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        jobs.append((name, job))
    return jobs


def parse_job(entry, args, parser: argparse.ArgumentParser, defaults: dict) -> argparse.Namespace:
    """Parse a job's keys (the ``train`` options, '-' or '_') as ``prospect train`` parses its flags."""
    if not isinstance(entry, dict) or "images" not in entry or "out" not in entry:
        raise ValueError('a job must be a JSON object with "images" and "out"')
    images = [entry["images"]] if isinstance(entry["images"], str) else entry["images"]
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise ValueError('"images" must be a file or folder name, or a non-empty list of them')
    argv, given = [], set()
    for key, value in entry.items():
        dest = key.replace("-", "_")
        if dest == "images":
            continue
        if dest not in defaults:
            raise ValueError(f"unknown key {key!r} (the keys are the options of prospect train; the model is set "
                             "for all jobs on the command line)")
        given.add(dest)
        flag = "--" + dest.replace("_", "-")
        values = value if isinstance(value, list) and dest in ("template", "template_at") else [value]  # repeatable
        for v in values:
            if isinstance(v, bool) and defaults[dest] is False:  # an on/off option
                argv += [flag] if v else []
            elif v is not None:  # null: the option's default
                if isinstance(v, (bool, list, dict)):
                    raise ValueError(f"{key}: expected a single value, got {json.dumps(v)}")
                argv.append(f"{flag}={v}")
    namespace = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in given})
    return parser.parse_args(argv + ["--", *images], namespace=namespace)
