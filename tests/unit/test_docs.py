"""The front door and the docs site: README stays short and its links and example hold; the MkDocs
site (docs/, mkdocs.yml) builds with --strict, so a broken link, a missing page or a page left out
of the nav fails the suite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_docs_site_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    run = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "security" / "index.html").exists()


def test_the_readme_is_a_short_front_door_whose_links_resolve():
    for name in ("README.md", "benchmarks/README.md", "benchmarks/results/INDEX.md"):
        page = ROOT / name
        text = page.read_text()
        targets = [t for t in LINK.findall(text) if "://" not in t]
        missing = [t for t in targets if not (page.parent / t).exists()]
        assert not missing, (name, missing)
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "scripts/test.sh" in readme          # the test command CI runs (.ci/run)
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_readmes_deployment_file_is_the_example_the_tests_render():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## One deployment file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT / "examples" / "reference-site.yaml").read_text()


#: A command line as the docs show it: `hpcserve ...` in a code span, or a code line (indented or
#: fenced, after an optional `$ `).
_SPAN = re.compile(r"`(hpcserve [^`]+)`")
_LINE = re.compile(r"^(?: {4}|\t)\s*(?:\$ )?(hpcserve [^\n]+)$", re.MULTILINE)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """[(page, "span" or "line", argv after `hpcserve`)] of every hpcserve command line in
    README.md and docs/ (a code span in prose may name a command without its arguments):
    comments (`  # ...`) and what follows a pipe or a redirection dropped; usage notation
    (`[--job]`, `add/list/set/revoke`, `...`) expanded into each form or left out."""
    import shlex
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", page.read_text())    # a line continued with a backslash
        for kind, line in [("span", m) for m in _SPAN.findall(text)] + [("line", m) for m in _LINE.findall(text)]:
            line = re.split(r"\s+#\s|\s\|\s|\s>>?\s", line)[0].strip()
            if "..." in line or "<" in line:
                continue
            optional = re.findall(r"\[([^\]]+)\]", line)
            forms = [re.sub(r"\s*\[[^\]]+\]", "", line)]
            if optional:
                forms.append(re.sub(r"\[([^\]]+)\]", r"\1", line))
            for form in forms:
                words = shlex.split(form)[1:]
                choices = [w.split("/") if re.fullmatch(r"[a-z]+(/[a-z]+)+", w) else [w] for w in words]
                for i, options in enumerate(choices):
                    if len(options) > 1:
                        found += [(page.name, kind, [*words[:i], option, *words[i + 1:]]) for option in options]
                        break
                else:
                    found.append((page.name, kind, words))
    return found


def parse(argv: list[str]) -> None:
    """Parse `argv` as hpcserve's command line, down to the last subcommand, without running it.

    Raises:
        click.UsageError: an unknown command or option, or a missing or bad argument.
    """
    import click

    from hpcserve.cli.context import Context
    from hpcserve.cli.pool import cli

    def rest(ctx: click.Context) -> list[str]:
        return [*getattr(ctx, "_protected_args", []), *ctx.args]

    group: click.Group = cli
    parent = cli.make_context("hpcserve", list(argv))
    parent.obj = Context(Path("hpcserve.yaml"), False)    # what the group's callback makes first
    remaining = rest(parent)
    while remaining:
        name, command, remaining = group.resolve_command(parent, remaining)
        assert command is not None and name is not None
        context = command.make_context(name, remaining, parent=parent)
        if not isinstance(command, click.Group):
            return
        group, parent, remaining = command, context, rest(context)


def test_every_command_the_docs_show_is_one_the_cli_takes():
    """Each hpcserve command line in README.md and docs/ names commands and options the CLI has;
    a code line (a command to run) also has the arguments it needs. A renamed option or command
    fails here, not in a reader's shell."""
    import click
    commands = documented_commands()
    assert len(commands) > 40 and ("install.md", "line", ["check", "--job"]) in commands
    bad = []
    for page, kind, argv in commands:
        try:
            parse(argv)
        except (click.MissingParameter, click.BadParameter) as exc:
            a_file_of_the_reader = isinstance(exc, click.BadParameter) and isinstance(getattr(exc.param, "type", None),
                                                                                      click.Path)
            if kind == "line" and not a_file_of_the_reader:   # a span names the command; its arguments
                bad.append((page, " ".join(argv), exc.format_message()))   # may be left out or be NAME
        except click.UsageError as exc:
            bad.append((page, " ".join(argv), exc.format_message()))
    assert not bad, bad
