"""Make a process run one system call of the test's choosing, as if its own code had made it: ptrace stops its
main thread inside the system call it is blocked in, turns the instruction pointer back onto that ``syscall``
instruction with other registers, and lets it go. The call then meets the process's seccomp filter, its
namespaces and its credentials exactly as a compromised VMM's own call would. x86-64 only."""
import ctypes
import os

PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH, PTRACE_PEEKTEXT = 12, 13, 17, 1
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
SYSCALL_INSN = b"\x0f\x05"


class Regs(ctypes.Structure):  # struct user_regs_struct, <sys/user.h>
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, pid: int, addr=None, data=None) -> int:
    ctypes.set_errno(0)
    ret = _libc.ptrace(request, pid, addr, data)
    if ret == -1 and ctypes.get_errno():
        raise OSError(ctypes.get_errno(), f"ptrace({request}) on {pid}: {os.strerror(ctypes.get_errno())}")
    return ret


def inject_syscall(pid: int, number: int, *args: int) -> None:
    """Have ``pid``'s main thread, blocked in a system call, make system call ``number`` with ``args`` instead.
    Nothing is restored afterwards: the tests use it for calls that end the process (or leave it be)."""
    _ptrace(PTRACE_SEIZE, pid)
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        os.waitpid(pid, 0x40000000)  # __WALL: the group-stop of the interrupt
        regs = Regs()
        _ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(regs))
        if regs.orig_rax > 0x7FFFFFFF:
            raise AssertionError(f"process {pid}'s main thread is not blocked in a system call")
        word = _ptrace(PTRACE_PEEKTEXT, pid, ctypes.c_void_p(regs.rip - 2))
        if (word & 0xFFFF).to_bytes(2, "little") != SYSCALL_INSN:
            raise AssertionError("no syscall instruction before the stopped instruction pointer")
        regs.rip -= 2
        regs.rax, regs.orig_rax = number, 2**64 - 1  # -1: the kernel must not restart the interrupted call
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, value % 2**64)
        _ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(regs))
    finally:
        _ptrace(PTRACE_DETACH, pid, None, None)
