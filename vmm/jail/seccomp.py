"""Seccomp allow-lists, built with libseccomp (vmm/jail/_build.py), one per process role.

The default action kills the whole process (SECCOMP_RET_KILL_PROCESS: the daemon sees it die by SIGSYS and
reports the clone failed with that reason). Calls that name a file by path are answered EACCES instead: the
jail's root is empty anyway, and Python asks for files on its own (an import not made before the jail, a
traceback's source lines), which must fail as an error, not kill a clone that did nothing wrong.

Why each call is there (docs/security.md has the table):
- KVM and userfaultfd: ioctl, restricted to the KVMIO and UFFDIO families and four tty/fd ioctls Python's I/O
  layer issues; userfaultfd itself (a clone re-registers its memory on each recycle).
- Memory: mmap, munmap, mprotect, madvise, mremap, brk; process_vm_readv/writev on the process itself only
  (the VMM's fault-safe guest-memory copies, vmm_self_read/write).
- Descriptors it was given: read/write and their vector and positional forms, lseek, fstat (AT_EMPTY_PATH
  only), fcntl, dup, close, ftruncate, fallocate, fsync (snapshots written into descriptors the daemon opened).
- Its channel and the page server's socket: sendmsg, recvmsg, sendto, recvfrom, get/setsockopt, getsockname,
  shutdown; no socket, connect, bind or accept (the network and other processes are out of reach).
- Threads and time: clone (threads only: CLONE_THREAD), futex, set_robust_list, rseq, signals to its own
  threads (tgkill and kill of its own pid), setitimer (the vCPU run deadline), clocks, sleeps, poll/select/epoll.

The "vmm" role (`vmm jail`: one VMM serving the API, whose root is the jail directory, so a path names a file
in there and nowhere else) adds, as measured with strace -f through boot, invoke, pause, snapshot create, and
loads with the File and Uffd backends:
- Files by name inside its root: openat (the kernel image, snapshot files read and written), newfstatat with a
  path (os.stat: the socket's stale check, a config's isfile), rename (a snapshot file written under a temporary
  name, then put in place), unlink (the API socket, a failed snapshot's temporary file). The other calls that
  name a file still answer EACCES.
- mincore: a Full snapshot of a booted guest skips the pages never touched (vmm_range_has_data).
- Its API socket: socket and socketpair for AF_UNIX only (the server's own warm-up request goes over a
  socketpair), bind, listen, accept4; its own net namespace has no interface, and abstract Unix names are per
  namespace, so a Unix socket file inside the root is all it can reach.
- connect: the Uffd memory backend connects to the page server's socket, a file the orchestrator puts inside.
- userfaultfd: that backend's uffd where /dev/userfaultfd is absent (otherwise made by an ioctl on the device).
"""
from __future__ import annotations

import errno
import os
import socket

from vmm.errors import JailError
from vmm.jail.native import check, ffi, lib

FILE_BY_NAME = ("open", "openat", "openat2", "stat", "lstat", "access", "faccessat", "faccessat2", "readlink",
                "readlinkat", "statx", "getcwd", "statfs", "getdents64", "mkdir", "unlink", "rename")

BASE = (
    # memory
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
    # descriptors it holds
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "lseek", "close", "close_range",
    "dup", "dup3", "fcntl", "fstat", "ftruncate", "fallocate", "fsync", "fdatasync", "pipe2", "eventfd2",
    # sockets it was handed
    "sendmsg", "recvmsg", "sendto", "recvfrom", "getsockopt", "setsockopt", "getsockname", "getpeername",
    "shutdown",
    # waiting
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    # threads, signals, time
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "exit", "exit_group",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait", "sigaltstack",
    "restart_syscall", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "sched_yield",
    "sched_getaffinity", "setitimer", "getitimer", "clock_gettime", "clock_getres", "clock_nanosleep",
    "nanosleep", "gettimeofday", "getrandom", "membarrier", "uname",
)

# Role -> extra calls beyond BASE (those of FILE_BY_NAME listed are then allowed, not answered EACCES).
ROLES = {
    "worker": ("userfaultfd", "memfd_create"),          # a clone worker of snapd
    "vmm": ("userfaultfd", "mincore", "bind", "listen", "accept4", "connect",   # `vmm jail`: one VMM, the API,
            "openat", "rename", "unlink", "getdents64"),                         # files inside the jail root
                                                                  # (a listing: leftovers of killed snapshots)
}
# Roles that serve an API on a Unix socket file in their root: socket and socketpair (AF_UNIX), stat by name.
API_ROLES = ("vmm",)


class Rule:
    """One libseccomp rule: action for ``syscall`` when every (arg, op, a, b) comparison holds."""

    def __init__(self, syscall: str, action: int, *comparisons: tuple[int, int, int, int]):
        self.syscall, self.action, self.comparisons = syscall, action, comparisons


def _syscall_number(name: str) -> int | None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    return None if nr < 0 else nr


def rules_for(role: str, pid: int) -> list[Rule]:
    """The allow-list of ``role`` for a process whose own pid (as it sees it) is ``pid``."""
    if role not in ROLES:
        raise JailError("seccomp profile", errno.EINVAL, f"no seccomp role {role!r} (known: {', '.join(ROLES)})")
    allow, eacces = lib.SCMP_ACT_ALLOW, lib.jail_scmp_act_errno(errno.EACCES)
    rules = [Rule(name, allow) for name in BASE + ROLES[role]]
    if role in API_ROLES:
        rules += [Rule(name, allow, (0, lib.SCMP_CMP_EQ, socket.AF_UNIX, 0)) for name in ("socket", "socketpair")]
    rules += [Rule(name, eacces) for name in FILE_BY_NAME if name not in ROLES[role]]
    mask_eq = lib.SCMP_CMP_MASKED_EQ
    rules += [Rule("ioctl", allow, (1, mask_eq, 0xFF00, family << 8)) for family in (lib.KVMIO, lib.UFFDIO)]
    rules += [Rule("ioctl", allow, (1, lib.SCMP_CMP_EQ, request, 0))
              for request in (lib.FIONBIO, lib.FIOCLEX, lib.FIONCLEX, lib.FIONREAD, lib.TCGETS)]
    if role in API_ROLES:  # os.stat by name, inside its root
        rules.append(Rule("newfstatat", allow))
    else:
        rules.append(Rule("newfstatat", allow, (3, mask_eq, lib.AT_EMPTY_PATH, lib.AT_EMPTY_PATH)))
        rules.append(Rule("newfstatat", eacces, (3, mask_eq, lib.AT_EMPTY_PATH, 0)))
    rules.append(Rule("clone", allow, (0, mask_eq, lib.CLONE_THREAD, lib.CLONE_THREAD)))
    # clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes glibc fall back to clone.
    rules.append(Rule("clone3", lib.jail_scmp_act_errno(errno.ENOSYS)))
    for name in ("tgkill", "kill", "process_vm_readv", "process_vm_writev"):  # itself only
        rules.append(Rule(name, allow, (0, lib.SCMP_CMP_EQ, pid, 0)))
    return rules


def compile(role: str, pid: int) -> bytes:  # noqa: A001 (what libseccomp does: rules to a BPF program)
    """``role``'s allow-list for a process whose own pid (as it sees it) is ``pid``, as a BPF program that
    ``install`` loads. Built where it is cheap (the zygote, once), installed where it is needed (each worker)."""
    ctx = lib.seccomp_init(lib.SCMP_ACT_KILL_PROCESS)
    if ctx == ffi.NULL:
        raise JailError("seccomp_init", errno.ENOMEM)
    try:
        # A binary tree over the syscall numbers, not a list: every call a VMM makes (each KVM_RUN) passes the
        # filter, ~0.6-0.8 us per call here with the list.
        check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_OPTIMIZE, 2), "seccomp_attr_set(CTL_OPTIMIZE)")
        seen = set()
        for rule in rules_for(role, pid):
            nr = _syscall_number(rule.syscall)
            if nr is None:
                continue  # not a call on this architecture (open/stat on arm64, say)
            if not rule.comparisons and (rule.syscall, rule.action) in seen:
                continue
            seen.add((rule.syscall, rule.action))
            args = ffi.new("struct scmp_arg_cmp[]", [
                {"arg": a, "op": op, "datum_a": da, "datum_b": db} for a, op, da, db in rule.comparisons] or 1)
            check(lib.seccomp_rule_add_array(ctx, rule.action, nr, len(rule.comparisons), args),
                  "seccomp_rule_add", rule.syscall)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            check(lib.seccomp_export_bpf(ctx, write_end), "seccomp_export_bpf", role)
            os.close(write_end)
            write_end = -1
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    finally:
        lib.seccomp_release(ctx)


def install(program: bytes) -> None:
    """Load a program from ``compile`` on the calling thread (and the threads it starts later)."""
    check(lib.jail_load_filter(program, len(program)), "prctl(PR_SET_SECCOMP)")


def load(role: str, pid: int | None = None) -> None:
    """Compile and install ``role``'s filter here."""
    install(compile(role, os.getpid() if pid is None else pid))
