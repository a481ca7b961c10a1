"""What every hpcserve command shares: the click context object, the consoles, the options that
may follow a command, and the deployment lock. The command modules (pool.py, access.py,
clients.py, site.py) import from here, never from each other (pool.py adds the others' commands to
its group)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console

from .. import config as config_mod
from ..config import Deployment
from ..control.reconcile import Outcome, Reconciler, summary
from .. import slurm
from ..slurm import Scheduler
from ..slurm.accounting import Accounting
from ..state import StateDir

err = Console(stderr=True, highlight=False, soft_wrap=True)  # a log line is never wrapped
# Piped into a file or another program, rich would cut the table at 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


class Context:
    """What every command gets: the deployment file's path and how to print."""

    def __init__(self, file: Path, as_json: bool):
        self.file = file
        self.as_json = as_json
        self._deployment: Deployment | None = None
        self._scheduler: Scheduler | None = None

    @property
    def deployment(self) -> Deployment:
        if self._deployment is None:
            self._deployment = config_mod.load(self.file)
        return self._deployment

    def scheduler(self) -> Scheduler:
        """The deployment's scheduler: local processes (scheduler: local), or Slurm through a
        matching pyslurm if one imports, else through Slurm's commands."""
        if self._scheduler is None:
            self._scheduler = slurm.for_deployment(self.deployment, notice=self.say)
        return self._scheduler

    def reconciler(self) -> Reconciler:
        """The deployment's Reconciler; each change a step makes is said on stderr."""
        accounting = Accounting() if self.deployment.scheduler == "slurm" else None
        return Reconciler(self.deployment, self.scheduler(), report=self.say, accounting=accounting)

    def say(self, line: str) -> None:
        """Progress and changes go to stderr, so --json output on stdout stays clean."""
        err.print(line)

    @staticmethod
    def log_commands() -> None:
        """-v: hpcserve's debug log (every outside command, every runtime API command) on stderr;
        hpcserve's own loggers only, since httpx and asyncio would drown them."""
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("hpcserve").addHandler(handler)
        logging.getLogger("hpcserve").setLevel(logging.DEBUG)

    def finish_drains(self, outcome: Outcome, drain_timeout: float | None) -> Outcome:
        """Reconciler.finish_drains with a spinner on stderr naming what is still draining."""
        with err.status("draining", spinner="dots") as spinner:
            return self.reconciler().finish_drains(
                outcome, drain_timeout, on_progress=lambda line: spinner.update(f"draining: {line}"))

    def wait_ready(self, wanted: dict[str, int], outcome: Outcome, timeout: float) -> Outcome:
        """Reconciler.wait_ready with a spinner on stderr (each new line printed too when stderr is
        not a terminal, so a log shows the progress)."""
        last = [""]

        def show(line: str) -> None:
            spinner.update(f"waiting: {line}")
            if line != last[0] and not err.is_terminal:
                self.say(f"waiting: {line}")
            last[0] = line

        with err.status("waiting for ready replicas", spinner="dots") as spinner:
            return self.reconciler().wait_ready(wanted, outcome, timeout, on_progress=show)

    def print_summary(self, outcome: Outcome, message: str) -> None:
        """A changing command's last word: `message` on stdout, or with --json the step's summary
        (reconcile.summary)."""
        if self.as_json:
            click.echo(json.dumps(summary(outcome, message, self.deployment.url), indent=2))
        else:
            out.print(message)


pass_ctx = click.make_pass_decorator(Context)


def late_options(command: Callable[..., None]) -> Callable[..., None]:
    """`-f FILE` and `--json` after the command too (`hpcserve status -f x.yaml`, as kubectl takes
    `apply -f`): the value given there wins over one given before the command."""
    def set_file(click_ctx: click.Context, _param, value: Path | None) -> None:
        if value is not None:
            click_ctx.ensure_object(Context).file = value

    def set_json(click_ctx: click.Context, _param, value: bool) -> None:
        if value:
            click_ctx.ensure_object(Context).as_json = True

    command = click.option("-f", "--file", type=click.Path(dir_okay=False, path_type=Path), expose_value=False,
                           callback=set_file, is_eager=True, help="The deployment file (as before the command).")(command)
    return click.option("--json", is_flag=True, expose_value=False, callback=set_json, is_eager=True,
                        help="Print a JSON document on stdout (as before the command).")(command)


def deployment_lock(ctx: Context, timeout: float = 600.0) -> contextlib.AbstractContextManager[None]:
    """Hold the deployment's lock (one changing command at a time); a wait longer than `timeout`
    seconds ends the command with one line naming the lock file (StateDir.exclusive)."""
    return StateDir(ctx.deployment.state_dir).exclusive(timeout)
