"""One cgroup per jailed VMM worker: a memory limit (over it the kernel OOM-kills inside the group only), a
pids limit and a cpu weight, taken from the VM's machine config.

Works on cgroup v2 and on v1, per controller: each of memory, pids and cpu is looked up in /proc/self/mounts,
either as a v1 hierarchy mounted with that controller or listed in a cgroup2 mount's cgroup.controllers (the
kernel binds a controller to one hierarchy at a time, so the answer is unique). A controller found nowhere is
reported in ``missing``; its limit is then not applied, and the caller is told rather than left to assume it.

    group = CgroupGroup.create("snapd/d1", "worker-7", CgroupLimits.for_vm(mem_size_mib=128, vcpu_count=2))
    group.add(pid)              # or, in the child before exec: group.join()
    ...
    group.oom_killed()          # how many tasks the kernel OOM-killed inside the group
    group.remove()

`vmm jail --cgroup controller.file=value` writes raw controller files as Firecracker's jailer does:
``parse_setting`` checks one (a known controller, a plain file name, a printable value), ``write_settings``
writes them into the group, in the hierarchy that carries that controller.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field

from vmm.errors import JailError

CONTROLLERS = ("memory", "pids", "cpu")
SETTING_CONTROLLERS = CONTROLLERS + ("cpuset",)  # what `vmm jail --cgroup` may write to
MiB = 1 << 20
# The VMM's own memory beside guest RAM: interpreter, cffi modules, device state, I/O buffers. A worker forked
# from a zygote is charged only for pages it touches after joining (charges do not move with a task).
VMM_OVERHEAD_MIB = 64
# Tasks beside the vCPU threads: main, uffd reader, stop/watch helpers, a few more for headroom. pids.max counts
# threads, so this bounds a fork or thread bomb without starving the VMM.
VMM_THREADS = 16
V1_SHARES = (2, 262144)  # the kernel's range of cpu.shares
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# controller.file (memory.limit_in_bytes, pids.max, cpu.cfs_quota_us, cpuset.cpus): no '/', no '..', no cgroup.*
_SETTING_FILE = re.compile(r"(?:memory|pids|cpu|cpuset)(?:\.[a-z0-9_]+)+")
_SETTING_VALUE = re.compile(r"[\x20-\x7e]{1,4096}")  # one line of printable ASCII
_CGROUP_FS = "/sys/fs/cgroup"


def check_name(name: str) -> str:
    """A group name becomes a path component: refuse anything that could leave its parent."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise JailError("cgroup name", errno.EINVAL, f"{name!r}: only [A-Za-z0-9_.-] allowed, not '.' or '..'")
    return name


def check_parent(parent: str) -> str:
    """A parent is a '/'-separated list of names (e.g. 'snapd/<daemon-id>'), each checked like a group name."""
    if not isinstance(parent, str) or not parent:
        raise JailError("cgroup name", errno.EINVAL, f"parent {parent!r} is empty")
    for part in parent.split("/"):
        check_name(part)
    return parent


@dataclass(frozen=True)
class CgroupLimits:
    """Limits of one group; None leaves that resource unlimited. cpu_weight has cgroup v2 meaning (1..10000,
    100 is the default share of one ordinary process)."""
    memory_bytes: int | None = None
    pids_max: int | None = None
    cpu_weight: int | None = None

    def __post_init__(self):
        for key, low, high in (("memory_bytes", MiB, None), ("pids_max", 1, None), ("cpu_weight", 1, 10000)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < low or (high and value > high)):
                raise ValueError(f"{key} {value!r} out of range [{low}, {high or 'inf'}]")

    @classmethod
    def for_vm(cls, mem_size_mib: int, vcpu_count: int, overhead_mib: int = VMM_OVERHEAD_MIB,
               vmm_threads: int = VMM_THREADS) -> "CgroupLimits":
        """Guest memory plus the VMM's overhead; one task per vCPU plus the VMM's own; cpu weight 100 per vCPU
        so that a 4-vCPU clone gets four times the share of a 1-vCPU clone under contention."""
        return cls(memory_bytes=(mem_size_mib + overhead_mib) * MiB, pids_max=vcpu_count + vmm_threads,
                   cpu_weight=max(1, min(10000, 100 * vcpu_count)))

    def cpu_shares(self) -> int:
        """v1's cpu.shares for the weight: 100 maps to v1's default 1024."""
        return max(V1_SHARES[0], min(V1_SHARES[1], self.cpu_weight * 1024 // 100))


@dataclass(frozen=True)
class Hierarchy:
    version: int                     # 1 or 2
    mount: str                       # its mount point
    controllers: tuple[str, ...]     # which of CONTROLLERS it carries


@dataclass(frozen=True)
class Layout:
    hierarchies: tuple[Hierarchy, ...]
    missing: tuple[str, ...]         # controllers mounted nowhere: their limits cannot be applied


def detect_layout(mounts: str = "/proc/self/mounts", controllers: tuple[str, ...] = CONTROLLERS) -> Layout:
    """Where each controller lives, read from the mount table rather than guessed from directory names."""
    v1: dict[str, str] = {}
    v2: list[str] = []
    with open(mounts) as f:
        for line in f:
            _dev, point, fstype, options = line.split()[:4]
            point = point.replace("\\040", " ")
            if fstype == "cgroup":
                for ctrl in options.split(","):
                    v1.setdefault(ctrl, point)          # a hierarchy bind-mounted twice: the first is enough
            elif fstype == "cgroup2":
                v2.append(point)
    # /sys/fs/cgroup itself first: on a pure v2 host it is the hierarchy the init system manages.
    v2.sort(key=lambda p: p != _CGROUP_FS)
    found: dict[tuple[int, str], list[str]] = {}
    missing = []
    for ctrl in controllers:
        where = None
        for point in v2:
            try:
                with open(os.path.join(point, "cgroup.controllers")) as f:
                    if ctrl in f.read().split():
                        where = (2, point)
                        break
            except OSError:
                continue
        if where is None and ctrl in v1:
            where = (1, v1[ctrl])
        if where is None:
            missing.append(ctrl)
        else:
            found.setdefault(where, []).append(ctrl)
    return Layout(tuple(Hierarchy(v, p, tuple(c)) for (v, p), c in found.items()), tuple(missing))


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise JailError(f"write {os.path.basename(path)}", e.errno or errno.EIO, f"{value!r} to {path}") from None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise JailError(f"read {os.path.basename(path)}", e.errno or errno.EIO, path) from None


def _keyed(text: str, key: str) -> int:
    """The number after ``key`` in a 'key value' per line file (memory.oom_control, memory.events)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def _rmdir(path: str, deadline: float) -> None:
    """rmdir a group; EBUSY while the kernel still lists tasks that have exited but are not yet released, so
    retry until the deadline and then name what is still in it."""
    delay = 0.001
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                procs = ""
                try:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        procs = " ".join(f.read().split())
                except OSError:
                    pass
                raise JailError("rmdir cgroup", e.errno or errno.EIO,
                                f"{path} (tasks still listed: {procs or 'none'})") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@dataclass
class CgroupGroup:
    """One group present in every hierarchy that carries a controller we use."""
    relpath: str                               # '/parent/name', as /proc/PID/cgroup spells it
    dirs: list[tuple[Hierarchy, str]]          # (hierarchy, directory) pairs, in creation order
    missing: tuple[str, ...] = ()              # controllers whose limits were asked for but not applied
    limits: CgroupLimits = field(default_factory=CgroupLimits)

    @classmethod
    def create(cls, parent: str, name: str, limits: CgroupLimits, layout: Layout | None = None) -> "CgroupGroup":
        """Make parent/name in every hierarchy (the parent too if missing) and write the limits before any task
        joins (v1 refuses a memory limit below current usage). A failure removes what was made."""
        check_parent(parent)
        check_name(name)
        layout = layout or detect_layout()
        wanted = {"memory": limits.memory_bytes, "pids": limits.pids_max, "cpu": limits.cpu_weight}
        missing = tuple(c for c in layout.missing if wanted.get(c) is not None)
        group = cls(f"/{parent}/{name}", [], missing, limits)
        try:
            for h in layout.hierarchies:
                group._make(h, parent, name)
        except BaseException:
            group.remove(timeout=0.5)
            raise
        return group

    def _make(self, h: Hierarchy, parent: str, name: str) -> None:
        lim = self.limits
        if h.version == 2:
            # A v2 controller's files appear in a child only if every ancestor enables it for its children.
            # Our parents hold no tasks, so v2's "no internal processes" rule does not refuse this.
            enable = " ".join("+" + c for c in h.controllers)
            path = h.mount
            for part in parent.split("/"):
                _write(os.path.join(path, "cgroup.subtree_control"), enable)
                path = os.path.join(path, part)
                _mkdir(path, exist_ok=True)
            _write(os.path.join(path, "cgroup.subtree_control"), enable)
        else:
            _mkdir(os.path.join(h.mount, parent), exist_ok=True, parents=True)
        path = os.path.join(h.mount, parent, name)
        _mkdir(path, exist_ok=False)
        self.dirs.append((h, path))
        if h.version == 1 and "cpuset" in h.controllers:
            _inherit_cpuset_v1(h.mount, parent.split("/") + [name])
        v2 = h.version == 2
        if "memory" in h.controllers and lim.memory_bytes is not None:
            _write(os.path.join(path, "memory.max" if v2 else "memory.limit_in_bytes"), str(lim.memory_bytes))
            if v2:
                # Without swap.max=0 a clone over its limit would swap instead of being killed; oom.group kills
                # the whole clone rather than leaving part of a worker running.
                for extra, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if os.path.exists(os.path.join(path, extra)):
                        _write(os.path.join(path, extra), value)
            # v1: memory.oom_control is left as created (oom_kill_disable 0) so the kernel kills inside the
            # group instead of pausing its tasks.
        if "pids" in h.controllers and lim.pids_max is not None:
            _write(os.path.join(path, "pids.max"), str(lim.pids_max))
        if "cpu" in h.controllers and lim.cpu_weight is not None:
            if v2:
                _write(os.path.join(path, "cpu.weight"), str(lim.cpu_weight))
            else:
                _write(os.path.join(path, "cpu.shares"), str(lim.cpu_shares()))

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group in every hierarchy; pid 0 is the caller."""
        add_to(pid, [path for _h, path in self.dirs])

    def join(self) -> None:
        """Move the calling process in: '0' in cgroup.procs means the writer, on v1 and v2 alike."""
        self.add(0)

    def pids(self) -> list[int]:
        """The processes in the group (from the first hierarchy; all hierarchies hold the same ones)."""
        if not self.dirs:
            return []
        return [int(p) for p in _read(os.path.join(self.dirs[0][1], "cgroup.procs")).split()]

    def oom_killed(self) -> int:
        """How many tasks the kernel's OOM killer has killed inside this group (0 if memory is not controlled)."""
        for h, path in self.dirs:
            if "memory" in h.controllers:
                if h.version == 2:
                    return _keyed(_read(os.path.join(path, "memory.events")), "oom_kill")
                return _keyed(_read(os.path.join(path, "memory.oom_control")), "oom_kill")
        return 0

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir the group everywhere. Its tasks must have exited; a task still running after the timeout is
        a JailError naming it, never a hang."""
        deadline = time.monotonic() + timeout
        for _h, path in reversed(self.dirs):
            _rmdir(path, deadline)
        self.dirs.clear()


def _inherit_cpuset_v1(mount: str, parts: list[str]) -> None:
    """A new v1 cpuset group has no CPUs and no memory nodes, and refuses tasks until it has: each level we
    made gets its parent's (as Firecracker's jailer does). v2 needs nothing: an empty cpuset.cpus inherits."""
    path = mount
    for part in parts:
        parent, path = path, os.path.join(path, part)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not _read(os.path.join(path, name)).strip():
                _write(os.path.join(path, name), _read(os.path.join(parent, name)).strip())


def parse_setting(text: str) -> tuple[str, str]:
    """'controller.file=value' (memory.limit_in_bytes=1G, pids.max=64, cpuset.cpus=0) -> (file, value); a
    ValueError, one line, for anything else: a controller other than memory, pids, cpu or cpuset, a file name that
    is not plain (a '/', '..'), an empty, multi-line or non-printable value."""
    file, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"cgroup setting {text!r}: want controller.file=value (e.g. pids.max=64)")
    if not _SETTING_FILE.fullmatch(file):
        controller = file.split(".", 1)[0]
        if controller not in SETTING_CONTROLLERS:
            raise ValueError(f"cgroup setting {text!r}: controller {controller!r} is not one of "
                             f"{', '.join(SETTING_CONTROLLERS)}")
        raise ValueError(f"cgroup setting {text!r}: {file!r} is not a plain controller file name "
                         "(controller.name, lower-case letters, digits and '_')")
    if not _SETTING_VALUE.fullmatch(value):
        raise ValueError(f"cgroup setting {text!r}: the value must be one line of printable text (1-4096 chars)")
    return file, value


def write_settings(group: "CgroupGroup", settings) -> None:
    """Write each (file, value) of ``parse_setting`` into ``group``'s directory in the hierarchy that carries the
    file's controller. The file must exist there (v1 and v2 name some differently: v1's memory.limit_in_bytes is
    v2's memory.max); a missing controller or file is a JailError naming it, never a file created."""
    for file, value in settings:
        file, value = parse_setting(f"{file}={value}")
        controller = file.split(".", 1)[0]
        where = [(h, path) for h, path in group.dirs if h is not None and controller in h.controllers]
        if not where:
            raise JailError("cgroup setting", errno.ENOENT, f"{file}: no {controller} controller is mounted here")
        h, path = where[0]
        target = os.path.join(path, file)
        if not os.path.isfile(target):
            raise JailError("cgroup setting", errno.ENOENT, f"{file}: no such file in this cgroup v{h.version} "
                            f"hierarchy ({path})")
        _write(target, value)


def add_to(pid: int, dirs) -> None:
    """Move a process into the groups at ``dirs`` (made by someone else: a jailed worker joins the groups the
    daemon made for it, by their paths); pid 0 is the caller."""
    for path in dirs:
        _write(os.path.join(path, "cgroup.procs"), str(pid))


def _mkdir(path: str, exist_ok: bool, parents: bool = False) -> None:
    try:
        (os.makedirs if parents else os.mkdir)(path, 0o755)
    except FileExistsError:
        if not exist_ok:
            raise JailError("mkdir cgroup", errno.EEXIST, f"{path} already exists (a leftover? see remove_tree)")
    except OSError as e:
        raise JailError("mkdir cgroup", e.errno or errno.EIO, path) from None


def remove_tree(parent: str, kill: bool = False, timeout: float = 2.0, layout: Layout | None = None) -> None:
    """Remove parent and every group beneath it in every hierarchy: what a previous run of the daemon left.
    With kill, the processes still in those groups are SIGKILLed first (cgroup.kill where v2 has it)."""
    check_parent(parent)
    layout = layout or detect_layout()
    deadline = time.monotonic() + timeout
    for h in layout.hierarchies:
        top = os.path.join(h.mount, parent)
        if not os.path.isdir(top):
            continue
        if kill:
            for dirpath, _dirs, _files in os.walk(top):
                if os.path.exists(os.path.join(dirpath, "cgroup.kill")):
                    _write(os.path.join(dirpath, "cgroup.kill"), "1")
                    continue
                for pid in _read(os.path.join(dirpath, "cgroup.procs")).split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            _rmdir(dirpath, deadline)


def membership(pid: int | str = "self") -> dict[str, str]:
    """Where a process is, from /proc/PID/cgroup: controller -> path ('cpu' -> '/snapd/d1/w7'). The v2 line
    has no controller list; its path is under the key ''."""
    out: dict[str, str] = {}
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        _id, ctrls, path = line.split(":", 2)
        for ctrl in ctrls.split(",") if ctrls else [""]:
            out[ctrl] = path
    return out
