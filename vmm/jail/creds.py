"""Credentials of a jailed process: its own uid and gid, no supplementary groups, no capabilities in any set,
no_new_privs, and not dumpable (its memory and /proc files are closed to other processes of its uid)."""
from __future__ import annotations

from vmm.jail.native import check, lib


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """``uid``/``gid`` None: stay the user namespace's root (unprivileged mode), with no capabilities."""
    # The bounding set first: emptying it needs CAP_SETPCAP, which the uid change below takes away.
    check(lib.jail_drop_bounding_set(), "prctl(PR_CAPBSET_DROP)")
    if uid is not None:
        check(lib.jail_setgroups_none(), "setgroups(0)")
    if gid is not None:
        check(lib.jail_setresgid(gid), "setresgid", str(gid))
    if uid is not None:
        check(lib.jail_setresuid(uid), "setresuid", str(uid))  # leaving uid 0 clears the permitted set
    check(lib.jail_clear_capabilities(), "capset(0)")
    check(lib.jail_prctl(lib.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(lib.jail_prctl(lib.PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    if check(lib.jail_capabilities_empty(), "capget") != 1:
        raise PermissionError("capabilities are left after dropping them")
