"""The errors hpcserve raises, each with the exit code the CLI gives it.

Exit codes (documented in README.md): 1 other failure, 2 bad input (deployment file, arguments),
3 Slurm unreachable or refusing, 4 HAProxy failure, 5 a wait ran out of time.
"""

from __future__ import annotations


class HpcserveError(Exception):
    """Base class: a failure the CLI reports as one line, with `exit_code`."""

    exit_code = 1


class ConfigError(HpcserveError):
    """The deployment file or an argument is invalid; the message names the field."""

    exit_code = 2


class TemplateError(ConfigError):
    """A template (packaged, or a site's copy in templates_dir) is missing, broken or uses a value
    it does not have; the message names the template file and line."""


class CommandError(HpcserveError):
    """An outside command failed.

    Attributes:
        argv: the command as run (list of str).
        returncode: its exit status (int), or None when it could not be started or timed out.
        stdout, stderr: what it printed (str).
    """

    def __init__(self, argv: list[str], returncode: int | None, stdout: str, stderr: str, why: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = why or (stderr.strip().splitlines() or ["no output"])[-1]
        status = "could not run" if returncode is None else f"exited {returncode}"
        super().__init__(f"{argv[0]} {status}: {detail}")


class SlurmError(HpcserveError):
    """Slurm (slurmctld or its commands) failed; nothing was changed on its account."""

    exit_code = 3


class HAProxyError(HpcserveError):
    """HAProxy could not validate, start, reload or stop; the running config stays."""

    exit_code = 4


class WaitTimeout(HpcserveError):
    """A wait (for a ready replica, for a drain) ran past its deadline."""

    exit_code = 5


class DeploymentBusy(HpcserveError):
    """Another hpcserve command holds the deployment's lock past the wait allowed."""
