"""The README's test command is what CI runs, and it installs and tests every example
plugin package (the site itself is built by that command, with warnings as errors)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    section = (ROOT / "README.md").read_text().split("[start:test-command]")[1]
    return section.split("```bash\n")[1].split("\n```")[0]


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    assert "\n" not in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_test_command_installs_and_tests_every_example_package():
    command = _readme_test_command()
    packages = sorted(path.parent.name for path in (ROOT / "examples").glob("*/pyproject.toml"))
    assert len(packages) >= 3
    for package in packages:
        assert f" -e examples/{package}" in command, package
    assert "pytest -n 2 -q tests examples" in command and "mkdocs build --strict" in command


def test_every_documentation_page_is_in_the_site_navigation():
    navigation = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md"))
    missing = [page for page in pages if f": {page}" not in navigation]
    assert not missing, f"pages missing from mkdocs.yml nav: {missing}"
