"""The README and docs/ are the user guide: every script, module, file and config override they
show exists, every link between them resolves, the configuration reference lists exactly the keys
of config.py with their defaults, and nothing outside tests/ points at files users do not have."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
DOC_PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
# Every page a user reads, by path relative to the repository: the README first, then docs/.
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in DOC_PAGES}}
ALL_TEXT = "\n".join(PAGES.values())


def test_fresh_machine_commands_are_the_ci_ones():
    assert "bash scripts/quickstart.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m ([\w.]+)", ALL_TEXT))))
def test_every_module_shown_exists(module):
    path = REPO_ROOT / module.replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module


_FILE = r"\b((?:scripts|configs|benchmarks|audioset_dcls|preprocessing|tests|docker|docs)/[\w./-]+\.(?:sh|yaml|py|md|json))"


@pytest.mark.parametrize("path", sorted(set(re.findall(_FILE, ALL_TEXT))))
def test_every_file_shown_exists(path):
    assert (REPO_ROOT / path).is_file(), path


def test_train_overrides_shown_resolve():
    """Each `section.key=value` the README and docs show, with their own value, is accepted."""
    shown = sorted(set(re.findall(r"(?<![\w.])((?:data|model|optim|schedule|augment|train|eval|distill)\.[a-z_]+=[^\s`|]+)",
                                  ALL_TEXT)))
    # placeholders the reader fills in: N, PATH, ...
    shown = [s for s in shown if not re.fullmatch(r"[A-Z]+|\.\.\.", s.split("=", 1)[1])]
    assert len(shown) >= 8, shown
    proc = subprocess.run([sys.executable, "train.py", "--print-config", *shown], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{shown}\n{proc.stderr[-2000:]}"
    for item in shown:
        key = item.split("=", 1)[0].split(".", 1)[1]
        assert key in proc.stdout, f"{item} not in the resolved config"


def test_an_unknown_override_is_refused():
    proc = subprocess.run([sys.executable, "train.py", "--print-config", "data.bogus=1"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "data.bogus" in proc.stderr


# --------------------------------------------------------------------------- links


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # '#' lines in code blocks are not headings
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _local_links(text: str) -> list[str]:
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"[a-z]+:", link)]  # http:, https:, mailto:


@pytest.mark.parametrize("page", list(PAGES))
def test_links_resolve(page):
    """Every relative link of a page names an existing file, and its #anchor a heading there."""
    base = (REPO_ROOT / page).parent
    broken = []
    for link in _local_links(PAGES[page]):
        target, _, anchor = link.partition("#")
        path = (base / target).resolve() if target else REPO_ROOT / page
        if not path.is_file():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
            broken.append(f"{link} (no heading #{anchor} in {path.relative_to(REPO_ROOT)})")
    assert not broken, f"{page}: broken links: {broken}"


def test_readme_links_every_docs_page():
    linked = {(REPO_ROOT / link.partition("#")[0]).resolve() for link in _local_links(README)}
    assert DOC_PAGES and not [p.name for p in DOC_PAGES if p.resolve() not in linked]


# --------------------------------------------------------------------------- configuration reference


def _documented_keys() -> dict[str, str]:
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `(\w+\.\w+)` \| `([^`]*)` \|", text, flags=re.M)
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), f"keys listed twice: {sorted({k for k in keys if keys.count(k) > 1})}"
    return dict(rows)


def test_configuration_reference_lists_every_key_with_its_default():
    from audioset_dcls.config import Config, apply_overrides

    cfg = Config()
    defaults = {f"{s.name}.{f.name}": getattr(getattr(cfg, s.name), f.name)
                for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(cfg, s.name))}
    documented = _documented_keys()
    missing = [f"| `{k}` | `{v!r}` | ... |" for k, v in defaults.items() if k not in documented]
    assert not missing, "docs/configuration.md needs a row for each new key:\n" + "\n".join(missing)
    assert not set(documented) - set(defaults), f"documented but not in config.py: {set(documented) - set(defaults)}"
    for key, shown in documented.items():
        section, name = key.split(".")
        parsed = getattr(getattr(apply_overrides(cfg, [f"{key}={shown}"]), section), name)
        assert parsed == defaults[key], f"docs/configuration.md shows {key} = {shown}; config.py: {defaults[key]!r}"


# --------------------------------------------------------------------------- self-contained


_OUTSIDE = re.compile(r"(?:\.\./|/work/)shared\b|shared/(?:reference|audioset_meta)")
_SKIP_DIRS = {".git", ".venv", "tests", "runs", "build", "node_modules", "__pycache__", ".pytest_cache"}
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json", ".ini"}


def test_nothing_outside_tests_points_outside_the_repository():
    """Users have only the repository: code, configs and docs may not send them to ../shared
    (only tests may read the real AudioSet metadata there, and skip without it)."""
    offenders = []
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(root) / name
            if path.suffix not in _TEXT_SUFFIXES and name not in ("Dockerfile", ".dockerignore"):
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if _OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
