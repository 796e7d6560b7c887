"""The docs site builds: `mkdocs build --strict` over mkdocs.yml and docs/, every page in the nav, no warning;
and the README stays an overview that sends its reader there."""

import shutil
import subprocess
import sys

import yaml

from tests.helpers.doc_pages import DOCS, README, ROOT


def nav_pages(nav: list) -> list[str]:
    """The page files a mkdocs nav lists, in order, sections flattened."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_site_builds_strict_with_every_page_in_the_nav(tmp_path):
    # mkdocs.yml carries !!python/name tags only where plugins need them; it has none, so safe_load reads it.
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(listed) == on_disk, "every page of docs/ in the nav once, and nothing else"
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    for page in listed:
        assert (site / page.removesuffix(".md") / "index.html").exists() or page == "index.md", page
    assert (site / "index.html").exists()


def test_the_strict_build_fails_on_a_broken_link(tmp_path):
    """The build the test above trusts does fail: a copy of the site with one link to a missing page."""
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    (copy / "limits.md").write_text((copy / "limits.md").read_text() + "\n[gone](no-such-page.md)\n")
    config = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {copy}")
    (tmp_path / "mkdocs.yml").write_text(config)
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert build.returncode != 0
    assert "no-such-page.md" in build.stderr


def test_the_readme_is_an_overview_that_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) < 300
    for command in ("make demo", "make test"):
        assert command in text
    linked = {p.name for p in DOCS.glob("*.md") if f"(docs/{p.name}" in text}
    assert linked >= {p.name for p in DOCS.glob("*.md")} - {"index.md"}
