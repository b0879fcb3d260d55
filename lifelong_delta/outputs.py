"""Output paths that never touch a user's input: checks before the work, temporary folders, atomic replacement.

Every command that writes goes through here. The rules:

* An output is never the same path as an input, never inside one and never contains one, however either is
  spelled (relative, ``..``, symlinks, bind mounts: paths are compared resolved and by device and inode).
* An output folder is never the current directory or one of its parents (it is replaced as a whole).
* ``--overwrite`` replaces only a folder this tool wrote: it carries :data:`MARKER`, a JSON list of the files
  written, and holds nothing else. A folder without it, a file, or a symlink is refused. A plot is replaced only
  if it is a PNG whose ``Software`` text chunk names this tool.
* Work goes to a hidden temporary folder next to the output, tagged with :data:`TEMP_MARKER` (process id and start
  time). An interrupted run's folder is removed by the next run that writes next to it, once its process is gone.
* A study that runs ``lightning fit`` per (method, seed), each into its own folder below ``<out_dir>/runs/``,
  deletes one run's folder before running it again (``force``, or a run that stopped before writing its
  metrics): only a real folder below the study's ``runs`` folder, never a symlink or a path that leads out of it.
  Nothing else is ever deleted.
* Outputs follow the umask, like any file a user writes (a temporary folder is created ``0700`` and opened up
  before it is renamed into place).

Pure standard library: the commands call these checks before importing torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lifelong_delta.progress import format_bytes

__all__ = [
    "MARKER",
    "PNG_SOFTWARE",
    "TEMP_MARKER",
    "OutputPathError",
    "atomic_dir",
    "atomic_file",
    "check_can_create",
    "check_disjoint",
    "check_output_dir",
    "check_output_file",
    "clean_stale_temps",
    "commit_dir",
    "file_mode",
    "make_temp_dir",
    "remove_run_dir",
    "remove_temp_dir",
    "write_file",
]

TOOL = "lifelong-delta"
MARKER = ".lifelong-delta-output.json"
TEMP_MARKER = ".lifelong-delta-temp.json"
PNG_SOFTWARE = TOOL  # the ``Software`` text chunk of every PNG this tool writes

Inputs = Mapping[str, "str | os.PathLike[str] | None"]


class OutputPathError(ValueError):
    """An output path that would touch an input or a folder this tool did not write; the message says which."""


def umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and restore at once)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    """Mode of a new folder under the current umask (``0755`` under ``022``)."""
    return 0o777 & ~umask()


def file_mode() -> int:
    """Mode of a new file under the current umask (``0644`` under ``022``)."""
    return 0o666 & ~umask()


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[Path]:
    """``path`` and its parents, resolved."""
    return [path, *path.parents]


def _inside(inner: Path, outer: Path) -> bool:
    """Whether resolved ``inner`` is ``outer`` or lies under it, by name or by device and inode (bind mounts)."""
    if inner == outer or outer in inner.parents:
        return True
    target = _identity(outer)
    return target is not None and any(_identity(p) == target for p in _chain(inner) if p.exists())


def check_disjoint(out: str | os.PathLike[str], option: str, inputs: Inputs) -> None:
    """Refuse an output that is, contains or lies inside any of ``inputs`` (``{option: path}``).

    Raises:
        OutputPathError: naming both options and paths.
    """
    o = _resolved(out)
    for name, src in inputs.items():
        if src is None:
            continue
        s = _resolved(src)
        if _inside(o, s) and _inside(s, o):
            raise OutputPathError(f"{option} {out} is the same path as {name} {src}; write to a new path")
        if _inside(s, o):
            raise OutputPathError(f"{option} {out} contains {name} {src}; write to a new path outside the inputs")
        if _inside(o, s):
            raise OutputPathError(f"{option} {out} is inside {name} {src}; write to a new path outside the inputs")


def _writable_parent(path: Path, option: str) -> None:
    parent = _resolved(path).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write in {parent} (permission denied)")


def _written_files(folder: Path) -> set[str] | None:
    """The files listed in ``folder``'s marker, or None if it has no valid marker."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tool") != TOOL or not isinstance(record.get("files"), list):
        return None
    return {str(f) for f in record["files"]}


def _all_files(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [str(rel / d) + "/" for d in dirs if os.path.islink(Path(root) / d)]
        found += [str(rel / f) for f in files]
    return sorted(f[2:] if f.startswith("./") else f for f in found)


def check_output_dir(
    out: str | os.PathLike[str], *, overwrite: bool, inputs: Inputs = {}, option: str = "--out"
) -> Path:
    """Check that the folder ``out`` may be written (or replaced, with ``overwrite``) before any work starts.

    Returns:
        ``out`` as given, as a Path.

    Raises:
        OutputPathError: ``out`` overlaps an input, is the current folder or one of its parents, exists without
            ``overwrite``, is a file or a symlink, was not written by this tool, holds files this tool did not
            write, or its parent is not writable.
    """
    path = Path(out)
    check_disjoint(path, option, inputs)
    resolved, cwd = _resolved(path), _resolved(os.curdir)
    if _inside(cwd, resolved):
        what = "the current folder" if resolved == cwd else f"a parent of the current folder {cwd}"
        raise OutputPathError(
            f"{option} {out} is {what}; the output folder is written as a whole, so give a new folder"
        )
    if path.is_symlink():
        raise OutputPathError(f"{option} {out} is a symlink; give the folder itself or a new path")
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(
                f"{option} {out} is an existing file; {TOOL} writes a new folder there, so give a new path"
            )
        if not overwrite:
            raise OutputPathError(f"{option} {out} already exists; pass --overwrite to replace an output of {TOOL}")
        written = _written_files(path)
        if written is None:
            raise OutputPathError(
                f"{option} {out} exists and was not written by {TOOL} (no {MARKER}); "
                "--overwrite replaces only its own output folders: remove it yourself or "
                "give a new path"
            )
        foreign = [f for f in _all_files(path) if f not in written and f != MARKER]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputPathError(
                f"{option} {out} holds files {TOOL} did not write ({shown}); move them out or give a new path"
            )
    _writable_parent(path, option)
    return path


def check_can_create(path: str | os.PathLike[str], *, option: str) -> None:
    """Check, before long work, that the folder ``path`` exists or can be made, and can be written in.

    Raises:
        OutputPathError: a file stands where a folder is needed, or permission is missing.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    for folder in (p, *p.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OutputPathError(f"{option} {path}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputPathError(f"{option} {path}: cannot write in {folder} (permission denied)")
            return


def _png_software(path: Path) -> str | None:
    """The ``Software`` text chunk of a PNG file (None if it is not a PNG or has none)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IDAT" or kind == b"IEND":
                    return None
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)
                if kind == b"tEXt" and data.startswith(b"Software\0"):
                    return data[len(b"Software\0") :].decode("latin-1")
    except OSError:
        return None


def check_output_file(path: str | os.PathLike[str], *, option: str, inputs: Inputs = {}) -> Path:
    """Check that the PNG file ``path`` may be written: no overlap with an input, its folder exists, and an
    existing file there is a plot this tool wrote.

    Raises:
        OutputPathError: naming the option and what to fix.
    """
    p = Path(path)
    check_disjoint(p, option, inputs)
    if p.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name such as {p / 'plot.png'}")
    if not p.parent.is_dir():
        raise OutputPathError(f"{option} {path}: folder {p.parent} does not exist")
    if p.is_symlink():
        raise OutputPathError(f"{option} {path} is a symlink; give the file itself or a new path")
    if p.exists() and _png_software(p) != PNG_SOFTWARE:
        raise OutputPathError(
            f"{option} {path} exists and is not a plot written by {TOOL}; remove it yourself or give a new path"
        )
    _writable_parent(p, option)
    return p


# ------------------------------------------------------------------------------------------- temporary folders
def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), which tells a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new hidden folder in ``parent`` tagged with :data:`TEMP_MARKER` (this process), mode per the umask.

    Stale folders of interrupted runs in ``parent`` are removed first (:func:`clean_stale_temps`).
    """
    parent = Path(parent)
    clean_stale_temps(parent)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    pid = os.getpid()
    record = {"tool": TOOL, "pid": pid, "started": _start_time(pid), "host": socket.gethostname()}
    (tmp / TEMP_MARKER).write_text(json.dumps(record) + "\n")
    return tmp


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(Path(root) / f).st_size
            except OSError:
                pass
    return total


def clean_stale_temps(parent: str | os.PathLike[str], *, report: bool = True) -> list[Path]:
    """Remove the temporary folders this tool left in ``parent`` when a run was killed.

    Only hidden folders holding :data:`TEMP_MARKER` whose process is gone (on this host) are removed; each one is
    reported on stderr with its size. A folder of a run still going, or of another host, is left alone.

    Returns:
        The folders removed.
    """
    parent = Path(parent)
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        path = Path(entry.path)
        try:
            record = json.loads((path / TEMP_MARKER).read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.get("tool") != TOOL or record.get("host") != host or _alive(pid, record.get("started")):
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        if report:
            print(
                f"note: removed {path} ({format_bytes(size)}), left by an interrupted {TOOL} run (pid {pid})",
                file=sys.stderr,
                flush=True,
            )
    return removed


def remove_run_dir(run_dir: str | os.PathLike[str], *, runs: str | os.PathLike[str]) -> None:
    """Delete the folder of one study run before it runs again (no error if there is none).

    Lightning refuses to start a run whose folder holds an earlier run's ``config.yaml``, so a run re-run with
    ``force``, or one that stopped before writing its metrics, starts from an empty folder.

    Args:
        run_dir: the run's folder, e.g. ``runs/<method>/seed<k>``.
        runs: the study's folder of runs; ``run_dir`` must lie below it.

    Raises:
        OutputPathError: ``run_dir`` is not below ``runs`` (as spelled and once symlinks are resolved), or it is a
            symlink or a file.
    """
    run, root = Path(run_dir), Path(runs)
    if root not in run.parents or ".." in run.relative_to(root).parts:
        raise OutputPathError(f"{run_dir} is not a run folder below {runs}; not deleting it")
    if run.is_symlink() or (run.exists() and not run.is_dir()):
        raise OutputPathError(f"{run_dir} is not a folder; remove it yourself to run it again")
    if not run.exists():
        return
    if _resolved(root) not in _resolved(run).parents:
        raise OutputPathError(f"{run_dir} leads out of {runs} through a symlink; not deleting it")
    shutil.rmtree(run)


def remove_temp_dir(tmp: str | os.PathLike[str]) -> None:
    """Delete a folder made by :func:`make_temp_dir` (no error if it is gone)."""
    shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: Path, out: Path, *, overwrite: bool, command: str, inputs: Inputs = {}) -> Path:
    """Mark ``tmp`` as this tool's output and move it to ``out``, replacing an earlier output of this tool.

    The output marker lists every file of ``tmp``; the temporary marker is dropped. ``out`` is checked again
    (:func:`check_output_dir`) just before the swap.
    """
    (tmp / TEMP_MARKER).unlink(missing_ok=True)
    record = {"tool": TOOL, "command": command, "files": _all_files(tmp)}
    (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    os.chmod(tmp / MARKER, file_mode())
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    _swap_into_place(tmp, out)
    return out


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` goes to a tagged trash folder first, then is deleted."""
    if final.exists():
        trash = make_temp_dir(final.parent, f".{final.name}.old-")
        os.replace(final, trash / "old")
        os.replace(tmp, final)
        remove_temp_dir(trash)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder (:func:`make_temp_dir`) next to ``final`` to fill; on success it replaces ``final``,
    on any error or Ctrl-C it is removed. For this tool's own cache entries, which need no marker.

    What was written into it follows the umask, also files that a library creates ``0600`` (safetensors'
    ``save_file``, and so ``save_pretrained``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        (tmp / TEMP_MARKER).unlink()
        _follow_umask(tmp)
        _swap_into_place(tmp, final)
    finally:
        remove_temp_dir(tmp)


def _follow_umask(folder: Path) -> None:
    """Give every folder and regular file below ``folder`` the umask's mode. Symlinks, and files with another
    link (which could be someone else's file), are left alone."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode())
        for name in files:
            st = os.lstat(path := os.path.join(root, name))
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.chmod(path, file_mode())


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to ``path`` to write into; on success it becomes ``path`` (mode per the umask),
    on any error or Ctrl-C it is removed. Its name carries the process id, so the next call removes one that a
    killed process left."""
    path = Path(path)
    parent = path.parent
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-\w+\.tmp")
    for entry in os.scandir(parent):
        m = pattern.fullmatch(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _alive(int(m[1]), None):
            Path(entry.path).unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_png(path: str | os.PathLike[str], fig: Any, *, dpi: int = 110) -> None:
    """Render a matplotlib figure as PNG and write it through :func:`write_file`."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_file(path, buf.getvalue())
