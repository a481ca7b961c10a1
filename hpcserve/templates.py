"""The Jinja2 environment for hpcserve's templates (sbatch scripts, haproxy.cfg).

Templates are real files: packaged ones live in `templates/` (shipped inside the wheel as
hpcserve/templates); a site overrides any of them by putting a file of the same name in the
deployment's `templates_dir`. StrictUndefined makes a missing value an error, not an empty string;
every value that reaches a shell goes through the `q` filter (shlex.quote).
"""

from __future__ import annotations

import shlex
import traceback
from pathlib import Path

import jinja2

from .errors import TemplateError

_HERE = Path(__file__).resolve().parent


def packaged_dir() -> Path:
    """The packaged templates: hpcserve/templates in a wheel, ../templates in a source checkout."""
    installed = _HERE / "templates"
    return installed if installed.is_dir() else _HERE.parent / "templates"


def environment(site_dir: Path | None = None) -> jinja2.Environment:
    """A Jinja2 environment that looks in `site_dir` first (if given), then the packaged templates."""
    paths = [str(site_dir)] if site_dir else []
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*paths, str(packaged_dir())]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["duration"] = duration
    return env


def duration(seconds: float) -> str:
    """An HAProxy time value: whole seconds as "600s", anything finer in milliseconds ("1500ms")."""
    millis = int(round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def render(name: str, site_dir: Path | None = None, **context: object) -> str:
    """Render template `name` with `context`.

    Raises:
        TemplateError: the template is missing, is not valid Jinja2, uses an undefined value or
            fails while rendering; one line naming the template file and line (exit code 2).
    """
    try:
        template = environment(site_dir).get_template(name)
    except jinja2.TemplateNotFound:
        where = " or ".join(str(d) for d in (site_dir, packaged_dir()) if d)
        raise TemplateError(f"template {name}: not found in {where}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {exc.filename or name}:{exc.lineno}: {exc.message}") from None
    try:
        return template.render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        # Jinja2 puts the template's own frames in the traceback, with the template's line numbers.
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == template.filename]
        where = f"{template.filename}:{lines[-1]}" if lines else str(template.filename or name)
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise TemplateError(f"template {where}: {message}") from None
