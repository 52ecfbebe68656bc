"""What the API may touch on the host: the files it reads beneath the import roots, the files it writes beneath
the snapshot root, and nothing else (docs/snapd.md, "What the API may touch").

- Reads (POST /v1/images ``state_path``, ``mem_path``, ``loading_set``; POST /v1/images/{id}/loading-set
  ``path``): beneath ``STATE/import/`` (made at start) and every ``--import-root``. A relative path is relative to
  the first import root; an absolute one must name a place beneath one of them. Each file is opened once
  (vmm.jail.beneath: openat2 RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV, regular files only) and
  read from that descriptor; the caller bounds its size before anything is read.
- Writes (POST /v1/clones/{id}/snapshot ``state_path``, ``mem_path``): beneath ``STATE/snapshots/`` only,
  relative names relative to it. New files under temporary names in the target's directory, put in place when
  both are complete and the memory file is checked to be the state file's own (its identity trailer), never over
  an existing file (``SnapshotFiles``). What a daemon killed meanwhile left (``.snapd-*.tmp``, and any
  ``.NAME.tmp-PID-*`` of snapd.atomic no live writer holds) is removed at the next start, in every directory
  beneath STATE/snapshots (``ApiPaths.remove_snapshot_leftovers``).

A refusal is an ApiError naming the request field, the path and the rule: 404 nothing at the path, 409 a write
target that exists, 400 anything else (outside the roots, a NUL byte, not a regular file, too large).
"""
from __future__ import annotations

import contextlib
import os

from snapd.atomic import TEMP_NAME, remove_stale_temps
from snapd.daemon.errors import BadRequest, CloneFailed, Conflict, NotFound
from vmm.jail.beneath import NewFile, PathExists, PathMissing, PathRefused, Root


class PathsConfigError(ValueError):
    """An import root the daemon cannot use (named in the message)."""


def refusal(field: str, exc: PathRefused):
    """The API error for a refused path of request field ``field``."""
    status = NotFound if isinstance(exc, PathMissing) else Conflict if isinstance(exc, PathExists) else BadRequest
    return status(f"{field}: {exc}")


class ApiPaths:
    def __init__(self, state_dir: str, import_roots=()):
        self.imports: list[Root] = []
        self.snapshots: Root | None = None
        try:
            self.imports.append(Root(os.path.join(state_dir, "import"), create=True))
            for path in import_roots:
                try:
                    self.imports.append(Root(path))
                except OSError as exc:
                    raise PathsConfigError(f"import root {path}: {exc.strerror} (it must be an existing "
                                           "directory)") from None
            self.snapshots = Root(os.path.join(state_dir, "snapshots"), create=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for root in self.imports + ([self.snapshots] if self.snapshots else []):
            root.close()

    def import_rule(self) -> str:
        return ("paths the API reads must lie beneath an import root (" + ", ".join(r.path for r in self.imports) +
                "; relative paths are relative to the first; more with snapd serve --import-root DIR)")

    def _import_root(self, path: str, field: str) -> Root:
        first = self.imports[0]
        try:
            first.check(path)
        except PathRefused as exc:
            raise refusal(field, exc) from None
        if not os.path.isabs(path):
            return first
        for root in self.imports:
            if root.contains(path):
                return root
        raise BadRequest(f"{field}: path {path!r} is outside the import roots: {self.import_rule()}")

    def open_import(self, path: str, field: str, max_size: int | None = None) -> tuple[int, str]:
        """(read-only descriptor, absolute name) of the regular file at a caller's ``path`` beneath an import root,
        at most ``max_size`` bytes; the caller closes the descriptor."""
        root = self._import_root(path, field)
        try:
            return root.open_file(path, max_size), root.display(path)
        except PathRefused as exc:
            raise refusal(field, exc) from None

    @contextlib.contextmanager
    def opened(self, path: str, field: str, max_size: int | None = None):
        fd, name = self.open_import(path, field, max_size)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def remove_snapshot_leftovers(self) -> list[str]:
        """Remove the temporary files of clone snapshots a previous daemon did not finish, in STATE/snapshots and
        every directory beneath it (symbolic links are not followed): each ``.snapd-*.tmp`` (only the daemon of
        this state directory makes them, and it is starting), and each ``.NAME.tmp-PID-*`` whose writer is gone
        (snapd.atomic). Returns their paths."""
        removed = []
        for directory, _, names in os.walk(self.snapshots.path):
            for name in names:
                if name.startswith(".snapd-") and name.endswith(".tmp"):
                    try:
                        os.unlink(os.path.join(directory, name))
                        removed.append(os.path.join(directory, name))
                    except OSError:
                        pass
            if any(TEMP_NAME.match(name) for name in names):
                removed += [os.path.join(directory, name) for name in remove_stale_temps(directory)]
        return removed

    def snapshot_files(self, state_path: str, mem_path: str) -> "SnapshotFiles":
        return SnapshotFiles(self.snapshots, state_path, mem_path)


class SnapshotFiles:
    """A clone snapshot's two new files beneath the snapshot root: created (temporary names, O_EXCL) in their
    targets' directories, written by whoever gets ``fds`` (the clone's worker, over its channel), then ``commit``
    fsyncs both and puts both in place, or nothing: ``close`` before a commit leaves both targets untouched."""

    def __init__(self, root: Root, state_path: str, mem_path: str):
        self.state = self.mem = None
        try:
            self.state = self._new(root, state_path, "snapshot.state_path")
            self.mem = self._new(root, mem_path, "snapshot.mem_path")
            if self.state.target == self.mem.target:
                raise BadRequest(f"snapshot: state_path {state_path!r} and mem_path {mem_path!r} name the same file")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _new(root: Root, path: str, field: str) -> NewFile:
        try:
            root.check(path)
            if not root.contains(path):
                raise BadRequest(f"{field}: path {path!r} is outside {root.path}: clone snapshots are written only "
                                 "beneath it (relative names are relative to it)")
            return NewFile(root, path)
        except PathRefused as exc:
            raise refusal(field, exc) from None

    @property
    def fds(self) -> list[int]:
        return [self.state.fd, self.mem.fd]

    @property
    def paths(self) -> dict:
        return {"state_path": self.state.path, "mem_path": self.mem.path}

    def commit(self) -> None:
        """Both files are complete: check that the memory file is the state file's own (what the worker wrote is
        not trusted: a mismatched pair is a 502 and nothing is put in place), fsync them, then link the memory
        file and the state file into place (a state file only beside its memory file); a target taken meanwhile
        (409) undoes the other."""
        from vmm.snapshot import SnapshotError, check_memory_file, read_snapshot_fd
        try:
            state, _ = read_snapshot_fd(self.state.fd, self.state.path)
            check_memory_file(self.mem.fd, state, self.state.path, self.mem.path)
        except SnapshotError as exc:
            raise CloneFailed(f"snapshot: the clone's worker wrote files that are not one snapshot ({exc}); "
                              "nothing was put in place") from None
        self.mem.sync()
        self.state.sync()
        try:
            self.mem.link()
            self.state.link()
        except PathExists as exc:
            self.mem.unlink()
            raise Conflict(f"snapshot: {exc}") from None

    def close(self) -> None:
        for new in (self.state, self.mem):
            if new is not None:
                new.close()
