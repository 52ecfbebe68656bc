"""Typed errors of the VMM. Each names what failed, so a user sees one clear line."""
import os


class VmmError(Exception):
    """Base of every error the VMM reports to a user."""


class KvmError(VmmError):
    """A KVM ioctl (or a syscall around it) failed; names the call and the errno."""

    def __init__(self, call: str, errno_value: int, detail: str = ""):
        self.call = call
        self.errno = errno_value
        text = f"{call} failed: {os.strerror(errno_value)} (errno {errno_value})"
        super().__init__(f"{text}: {detail}" if detail else text)


class JailError(KvmError):
    """A confinement step (namespace, mount, credentials, seccomp, cgroup, path resolution) failed; names the
    call and the errno."""


class KvmUnavailable(VmmError):
    """/dev/kvm is missing or cannot be opened."""


class ConfigError(VmmError):
    """The machine configuration asked for something impossible (memory size, vCPU count, ...)."""


class GuestImageError(VmmError):
    """The guest image is missing, not ELF, or does not fit in guest memory."""


class GuestFault(VmmError):
    """The guest stopped on a fault (triple fault, emulation failure, bad entry); carries the registers."""

    def __init__(self, message: str, registers: str = ""):
        self.registers = registers
        super().__init__(message)


class InvocationError(VmmError):
    """A function-port invocation could not be delivered or answered."""
