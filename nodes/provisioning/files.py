"""The upload_files step and its undo: UploadResult, rollback, discard_backups, and the managed-path checks."""

from __future__ import annotations

import hashlib
import io
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fabric import Connection

from nodes import layout
from nodes.ssh import ProvisioningError, command_error, is_root, run_root

ROLLBACK_DIR = layout.ROLLBACK_DIR
MANAGED_PREFIXES = layout.MANAGED_PREFIXES

_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@+-]+(/[A-Za-z0-9_.@+-]+)*$")


@dataclass
class UploadResult:
    """What upload_files did: ``backups`` maps every touched path to its saved previous version (None: was absent)."""

    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    backups: dict[str, str | None] = field(default_factory=dict)

    @property
    def touched(self) -> list[str]:
        return self.changed + self.removed


def upload_files(c: Connection, files: Mapping[str, object], *, remove: Iterable[str] = ()) -> UploadResult:
    """Make ``files`` (path -> object with ``content`` and ``mode``) exist exactly, and ``remove`` paths not exist.

    One command reads every remote hash and mode; only differing files go up. Each goes to a temporary name in its
    own directory (created 0600, so a key is never readable by others even for a moment), gets its mode, and all of
    them are renamed into place in one command, so OpenVPN never reads half a file or a mixed set.
    """
    wanted = {path: (_content(f), _mode(f)) for path, f in files.items()}
    gone = sorted(set(remove) - set(wanted))
    for path in [*wanted, *gone]:
        _check_path(path)
    remote = _remote_state(c, [*wanted, *gone])
    result = UploadResult(
        changed=sorted(p for p, (data, mode) in wanted.items() if remote.get(p) != (_sha256(data), mode)),
        removed=[p for p in gone if p in remote],
    )
    if not result.touched:
        return result
    for path in result.touched:
        result.backups[path] = ROLLBACK_DIR + path if path in remote else None
    try:
        _stage_and_commit(c, result, wanted)
    except Exception as exc:
        error = command_error("upload_files", exc)
        _try_rollback(c, result, error)
        raise error from exc
    return result


def rollback(c: Connection, result: UploadResult) -> None:
    """Put back exactly what upload_files replaced or removed, and delete the files it created."""
    if not result.touched:
        return
    commands = []
    for path, backup in result.backups.items():
        tmp = _tmp_name(path)
        if backup is None:
            commands.append(f"rm -f -- {shlex.quote(path)} {shlex.quote(tmp)}")
        else:  # cp -p made the backup, so mode, owner and mtime come back too
            commands.append(f"rm -f -- {shlex.quote(tmp)} && mv -f -- {shlex.quote(backup)} {shlex.quote(path)}")
    commands.append(f"rm -rf -- {ROLLBACK_DIR}")
    run_root(c, " && ".join(commands), hide=True)


def discard_backups(c: Connection, result: UploadResult) -> None:
    """Drop the previous versions once the run succeeded (they include private keys)."""
    if result.touched:
        run_root(c, f"rm -rf -- {ROLLBACK_DIR}", hide=True)


def _stage_and_commit(c: Connection, result: UploadResult, wanted: dict) -> None:
    prepare = [f"rm -rf -- {ROLLBACK_DIR}", f"mkdir -p -m 700 -- {ROLLBACK_DIR}"]
    for path, backup in result.backups.items():
        if backup:
            prepare.append(f"mkdir -p -- {shlex.quote(_dir(backup))} && cp -p -- {shlex.quote(path)} "
                           f"{shlex.quote(backup)}")
    for path in result.changed:
        prepare.append(f"mkdir -p -- {shlex.quote(_dir(path))} && "
                       f"install -m 600 /dev/null {shlex.quote(_tmp_name(path))}")
    run_root(c, " && ".join(prepare), hide=True)
    # SFTP runs as the login user: root writes the temporary file directly; anyone else stages in a private
    # directory of their own and root copies from there.
    staging = None if is_root(c) else c.run("mktemp -d", hide=True).stdout.strip()
    commit = []
    for index, path in enumerate(result.changed):
        data, mode = wanted[path]
        tmp = _tmp_name(path)
        target = tmp if staging is None else f"{staging}/{index}"
        c.put(io.BytesIO(data), remote=target)
        copy = "" if staging is None else f"cp -- {shlex.quote(target)} {shlex.quote(tmp)} && "
        commit.append(f"{copy}chmod {mode:o} {shlex.quote(tmp)} && mv -f -- {shlex.quote(tmp)} {shlex.quote(path)}")
    for path in result.removed:
        commit.append(f"rm -f -- {shlex.quote(path)}")  # its backup is already in ROLLBACK_DIR
    try:
        run_root(c, " && ".join(commit), hide=True)
    finally:
        if staging:
            c.run(f"rm -rf -- {shlex.quote(staging)}", hide=True, warn=True)


def _remote_state(c: Connection, paths: list[str]) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mode) for the paths that exist, in one round trip."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    out = run_root(c, f"sha256sum -- {quoted} 2>/dev/null; echo @@; stat -c '%a %n' -- {quoted} 2>/dev/null; true",
                   hide=True, warn=True).stdout
    hashes, _, modes = out.partition("@@\n")
    digest = {line[66:]: line[:64] for line in hashes.splitlines() if len(line) > 66}
    state = {}
    for line in modes.splitlines():
        mode, _, path = line.partition(" ")
        if path in digest:
            state[path] = (digest[path], int(mode, 8))
    return state


def _check_path(path: str) -> None:
    if not _PATH_RE.match(path) or "/../" in path + "/" or "/./" in path + "/" or not path.startswith(MANAGED_PREFIXES):
        raise ProvisioningError("upload_files", f"Refusing to write {path!r}: LanHub manages only plain paths "
                                f"under {', '.join(MANAGED_PREFIXES)}.", permanent=True)


def _content(f) -> bytes:
    content = f.content if hasattr(f, "content") else f
    return content.encode() if isinstance(content, str) else bytes(content)


def _mode(f) -> int:
    mode = getattr(f, "mode", 0o644)
    return int(mode, 8) if isinstance(mode, str) else int(mode)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dir(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _tmp_name(path: str) -> str:
    directory, name = path.rsplit("/", 1)
    return f"{directory}/.{name}.lanhub-new"  # same directory: the final mv is an atomic rename


def _try_rollback(c: Connection, result: UploadResult, error: ProvisioningError) -> None:
    try:
        rollback(c, result)
    except Exception as exc:  # keep the original failure; say the rollback failed too
        error.message += f" (restoring the previous files also failed: {_message(exc)})"


def _message(exc: BaseException) -> str:
    try:
        return command_error("rollback", exc).message
    except Exception:  # not a Fabric/SSH error: still report it rather than lose the original failure
        return f"{type(exc).__name__}: {exc}"
