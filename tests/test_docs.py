"""The documentation: the mkdocs site builds with --strict (every link and anchor resolves), its
generated references name every setting and every route parameter the code defines, and the README
stays short with links that resolve."""
from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"


def _hooks():
    """scripts/docs_hooks.py, whose ``_sources`` is the one place that names the modules read."""
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    assert MKDOCS.exists(), f"{MKDOCS} missing: scripts/setup.sh --with-test-tools installs mkdocs (the test extra)"
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                             "--site-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _rows(page: str) -> list[list[str]]:
    """Every table row of a built page, as the text of its cells."""
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
        rows.append([html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells])
    return rows


def _sections(page: str) -> dict[str, str]:
    """The built page cut at its h3 headings: heading text -> the HTML up to the next one."""
    parts = re.split(r"<h3[^>]*>(.*?)</h3>", page, flags=re.S)
    return {html.unescape(re.sub(r"<[^>]+>", "", parts[i])).replace("¶", "").strip(): parts[i + 1]
            for i in range(1, len(parts), 2)}


def test_site_builds_strict(site):
    for page in ("install", "api", "jobs", "operations", "systemd", "monitoring", "models", "gpu",
                 "kubernetes", "configuration", "security", "performance", "development"):
        assert (site / page / "index.html").exists(), page


def test_configuration_page_names_every_setting_and_its_variable(site):
    config, _ = _hooks()._sources()
    rows = {row[0]: row for row in _rows((site / "configuration" / "index.html").read_text()) if row}
    for f in fields(config.Settings):
        assert f.name in rows, f"setting {f.name} missing from the configuration reference"
        row = rows[f.name]
        assert config.ENV_PREFIX + f.name.upper() in row, (f.name, row)
        assert row[-1], f"setting {f.name} has no description"


def test_api_page_names_every_parameter_of_every_route(site):
    _, openapi = _hooks()._sources()
    sections = _sections((site / "api" / "index.html").read_text())
    assert openapi.OPERATIONS
    for op in openapi.OPERATIONS:
        route = f"{op.method.upper()} {op.path}"
        assert route in sections, f"{route} missing from the API page"
        text = sections[route]
        same = re.search(r"The same parameters as <code>([^<]+)</code>", text)
        if same:
            text = sections[html.unescape(same[1])]
        named = {row[0] for row in _rows(text) if row}
        for p in (op.params.params if op.params else ()):
            assert p.name in named, f"{route}: parameter {p.name} missing from the API page"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/"


def test_readme_relative_links_resolve():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    broken = [link for link in links
              if not re.match(r"[a-z]+:", link) and not link.startswith("#")
              and not (REPO / link.split("#")[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"
