"""The README is the user guide: every script, module and config it tells people to run exists,
and every `train.py` override key it shows is a real config key."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_fresh_machine_commands_are_the_ci_ones():
    assert "bash scripts/quickstart.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m ([\w.]+)", README))))
def test_every_module_in_the_readme_exists(module):
    path = REPO_ROOT / module.replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module


@pytest.mark.parametrize(
    "path", sorted(set(re.findall(r"\b((?:scripts|configs|benchmarks)/[\w./-]+\.(?:sh|yaml|py))", README)))
)
def test_every_file_in_the_readme_exists(path):
    assert (REPO_ROOT / path).is_file(), path


def test_train_overrides_shown_in_the_readme_resolve():
    """Each `section.key=value` the README shows, with the README's own value, is accepted."""
    shown = sorted(set(re.findall(r"(?<![\w.])((?:data|model|optim|schedule|augment|train|eval)\.[a-z_]+=[^\s`|]+)",
                                  README)))
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
