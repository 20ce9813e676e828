"""Command-line inputs -> the audio files to tag: files, folders (recursive) and ``@list.txt``.

Stable and complete: folders are listed in sorted order, and what a folder holds but cannot be
tagged (dangling links, unreadable files or sub-folders) is reported, never dropped silently.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

from .results import TagFailure

__all__ = ["AUDIO_EXTENSIONS", "expand_inputs"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf",
                    ".m4a", ".mp4", ".aac", ".opus", ".webm", ".mkv", ".wma")


def expand_inputs(inputs: Sequence[str], extensions: Sequence[str] = AUDIO_EXTENSIONS,
                  problems: list[TagFailure] | None = None) -> list[str]:
    """Files as given; folders searched recursively for audio extensions (sorted; symbolic
    links to folders are not followed); ``@list.txt`` read as one path per line (blank lines
    and ``#`` comments skipped, relative paths taken from the list file's folder). A missing path
    is kept, so it is reported later.

    What a folder holds but cannot be tagged is never left out silently: a dangling symbolic
    link (kind ``"missing"``), an audio file this process may not read or that is not a regular
    file, a sub-folder that cannot be listed (``"unreadable"``) go to ``problems`` as
    :class:`TagFailure` when a list is given, and stay in the result otherwise (tagging then
    reports them)."""
    exts = {e.lower() for e in extensions}
    out: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            list_path = Path(item[1:])
            for line in list_path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                out.extend(expand_inputs([str(p if p.is_absolute() else list_path.parent / p)], extensions, problems))
        elif os.path.isdir(item):
            found, bad = _walk_audio(item, exts)
            if problems is None:
                found += [b.source for b in bad]
            else:
                problems.extend(bad)
            out.extend(sorted(found))
        else:
            out.append(item)
    return out


def _walk_audio(folder: str, exts: set[str]) -> tuple[list[str], list[TagFailure]]:
    """(audio files under ``folder``, entries that cannot be tagged with why)."""
    found: list[str] = []
    bad: list[TagFailure] = []

    def unlisted(err: OSError) -> None:
        bad.append(TagFailure(str(err.filename), f"cannot list this folder ({err.strerror}): its files are not tagged",
                              "unreadable"))

    for root, _, names in os.walk(folder, onerror=unlisted):
        for name in names:
            if os.path.splitext(name)[1].lower() not in exts:
                continue
            path = os.path.join(root, name)
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                bad.append(TagFailure(path, f"dangling symbolic link (to {os.readlink(path)})", "missing"))
                continue
            except OSError as err:  # a symbolic link loop, a permission on the way
                bad.append(TagFailure(path, f"cannot be read ({err.strerror})", "unreadable"))
                continue
            if not stat.S_ISREG(mode):
                bad.append(TagFailure(path, "not a regular file (a pipe, socket or device)", "unreadable"))
            elif not os.access(path, os.R_OK):
                bad.append(TagFailure(path, "cannot be read (permission denied)", "unreadable"))
            else:
                found.append(path)
    bad.sort(key=lambda b: b.source)
    return found, bad
