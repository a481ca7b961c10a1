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
