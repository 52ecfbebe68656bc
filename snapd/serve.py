"""`snapd serve`: run the clone daemon (registered by snapd.cli; docs/snapd.md).

    snapd serve --state-dir DIR [--socket PATH] [--socket-group G] [--tcp-port N --token-file F]
                [--import-root DIR ...] [--pool-size N] [--max-clones N] ...
"""
from __future__ import annotations

import grp
import logging
import os
import stat
import resource
import selectors
import signal
import sys

from snapd.cli import CliError
from snapd.pool.jail import DEFAULT_UID_RANGE, parse_uid_range

log = logging.getLogger("snapd")


def _count(text: str) -> int:
    """A whole number >= 1 (argparse turns the ValueError into a usage error naming the option)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


def _uid_range(text: str) -> tuple[int, int]:
    return parse_uid_range(text)


_count.__name__, _port.__name__ = "whole number >= 1", "port (1-65535)"  # argparse's words for a bad value
_seconds.__name__ = "number of seconds > 0"
_uid_range.__name__ = "uid range FIRST-LAST"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the clone daemon: HTTP/JSON API on a Unix socket")
    p.add_argument("--state-dir", required=True,
                   help="images, chunk store, runtime records; STATE_DIR/import: where the API reads snapshots and "
                        "loading sets from; STATE_DIR/snapshots: where clone snapshots are written")
    p.add_argument("--socket", default=None, help="API socket (default: STATE_DIR/snapd.sock), mode 0660: its owner "
                                                  "and group may use the API (which starts VMs)")
    p.add_argument("--socket-group", default=None, metavar="NAME|GID",
                   help="the API socket's group (default: the daemon's primary group)")
    p.add_argument("--import-root", action="append", default=[], metavar="DIR",
                   help="another directory the API may read snapshots and loading sets beneath (repeatable; "
                        "STATE_DIR/import always is, and relative paths are relative to it)")
    p.add_argument("--tcp-port", type=_port, default=None,
                   help="also serve the API on 127.0.0.1:PORT (needs --token-file: every request must carry "
                        "Authorization: Bearer TOKEN, Host 127.0.0.1:PORT or localhost:PORT, JSON bodies)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="the bearer token of the TCP API (its first line; required with --tcp-port)")
    p.add_argument("--pool-size", type=_count, default=2, help="warm workers kept ready per VM shape (default 2)")
    p.add_argument("--max-spawning", type=_count, default=4, help="worker forks in flight at once (default 4)")
    p.add_argument("--max-clones", type=_count, default=1024, help="live clones, all images (default 1024)")
    p.add_argument("--max-count", type=_count, default=64, help="clones per request (default 64)")
    p.add_argument("--restore-timeout", type=float, default=30.0, help="seconds to get a worker and restore")
    p.add_argument("--huge-pages", default="auto", choices=("auto", "on", "off"),
                   help="keep shared images on 2 MiB pages, in a tmpfs mounted in the daemon's own mount "
                        "namespace (needs root; images then default to 2 MiB chunks). auto: if that works "
                        "(default); on: refuse to start without; off: plain memfds")
    p.add_argument("--lane", default="on", choices=("on", "off"),
                   help="restores of held prepared workers read, restored and answered in C, no Python on their "
                        "path (default on; off: every request the Python way on both sides, for comparison)")
    p.add_argument("--jail", default="on", choices=("on", "off"),
                   help="jail every clone worker: own uid from --uid-range, namespaces, empty root, no capabilities, "
                        "seccomp allow-list, cgroup (default on; off: a development switch, logged as a warning). "
                        "Run by a user that is not root: a user namespace per worker instead of its own uid, and no "
                        "cgroup (docs/snapd.md, \"As a user that is not root\")")
    p.add_argument("--uid-range", type=_uid_range, default=DEFAULT_UID_RANGE, metavar="FIRST-LAST",
                   help="uids (and gids) for jailed workers, one per live worker (default %d-%d)" % DEFAULT_UID_RANGE)
    p.add_argument("--clone-memory-mib", type=_count, default=None,
                   help="memory limit of each clone's cgroup in MiB (default: guest memory + 64 MiB)")
    p.add_argument("--clone-cpu-cgroups", default="on", choices=("on", "off"),
                   help="a cpu cgroup per clone, weighted by its vCPUs (default on; off: one cpu group for all "
                        "workers, the scheduler then fair per thread among them)")
    p.add_argument("--max-connections", type=_count, default=1024,
                   help="API connections open at once, both listeners (default 1024): one more gets a 503 and is "
                        "closed (docs/reliability.md)")
    p.add_argument("--idle-timeout", type=_seconds, default=60.0,
                   help="seconds a kept-alive connection may sit idle between requests before it is closed "
                        "(default 60)")
    p.add_argument("--request-timeout", type=_seconds, default=10.0,
                   help="seconds from a request's first byte to its last (head and body; default 10): a slower "
                        "one gets a 408 and its connection is closed; also how long a reply may wait for the "
                        "client to take it")
    p.add_argument("--max-inflight", type=_count, default=256,
                   help="requests served at once, one handler thread each (default 256): beyond that, a 503")
    p.add_argument("--log-level", default="warning", choices=("error", "warning", "info", "debug"))
    p.set_defaults(func=_serve)


def raise_fd_limit() -> None:
    """Each clone holds a worker channel, a uffd and a page-server socket in the daemon."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def socket_group(text: str | None) -> int:
    """The gid of --socket-group (a group name or a number); default: the daemon's primary group."""
    if text is None:
        return os.getgid()
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        pass
    if text.isdigit():
        return int(text)
    raise CliError(f"--socket-group {text}: no such group (give a group name or a numeric gid)")


def read_token(path: str | None, tcp_port: int | None) -> str | None:
    """The TCP API's bearer token: --tcp-port needs --token-file, a readable file whose first line is the token
    (printable ASCII, no spaces)."""
    if tcp_port is None:
        if path is not None:
            raise CliError("--token-file is only used with --tcp-port")
        return None
    if path is None:
        raise CliError("--tcp-port needs --token-file FILE: every TCP request must carry Authorization: Bearer "
                       "<token> (the API starts VMs, and TCP is open to every local user and web page)")
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CliError(f"--token-file {path}: not a regular file")
            data = f.read(4096)
    except OSError as exc:
        raise CliError(f"--token-file {path}: cannot read it: {exc.strerror}") from None
    token = data.split(b"\n", 1)[0].strip()
    if not token:
        raise CliError(f"--token-file {path}: empty: its first line must be the token")
    if not all(0x21 <= b <= 0x7e for b in token):
        raise CliError(f"--token-file {path}: the token must be printable ASCII without spaces")
    if info.st_mode & 0o077:
        log.warning("--token-file %s can be read by other users (mode %o): chmod 600 it", path, info.st_mode & 0o777)
    return token.decode("ascii")


def serve_unix_socket(path: str, daemon, gid: int, limits=None):
    """The API's Unix socket: bound with only its owner's bits (umask), then given its group, then mode 0660."""
    from snapd.daemon.http import SnapdUnixServer
    old_umask = os.umask(0o077)
    try:
        server = SnapdUnixServer(path, daemon, limits)
    finally:
        os.umask(old_umask)
    try:
        os.chown(path, os.getuid(), gid)
        os.chmod(path, 0o660)
    except OSError as exc:
        server.server_close()
        raise CliError(f"--socket-group: cannot give {path} group {gid}: {exc.strerror}") from None
    return server


def huge_pages_dir(mode: str, state_dir: str) -> str | None:
    """The huge-page tmpfs for shared images (snapd.hugetmpfs), per --huge-pages; None: plain memfds."""
    if mode == "off":
        return None
    from snapd.hugetmpfs import HugeTmpfsError, mount_private_huge_tmpfs
    try:
        return mount_private_huge_tmpfs(os.path.join(state_dir, "huge"))
    except HugeTmpfsError as exc:
        if mode == "on":
            raise CliError(f"--huge-pages on: {exc}") from None
        log.warning("shared images on plain memfds (4 KiB pages): %s", exc)
        return None


def _serve(args) -> int:
    from snapd.daemon.core import Daemon, DaemonConfig, DaemonConfigError
    from snapd.daemon.http import Limits, SnapdTcpServer
    from vmm.api.server import remove_stale_socket
    from snapd.pool.pool import PoolError
    from vmm.errors import VmmError

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("snapd: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    log.propagate = False
    raise_fd_limit()
    # Several daemon threads (HTTP, page-server accept, pool refill, monitor) share the GIL; a restore's reply
    # must not wait the default 5 ms for another thread to give it up.
    sys.setswitchinterval(0.0002)
    gid = socket_group(args.socket_group)  # the settings a caller can get wrong first: nothing is started yet
    token = read_token(args.token_file, args.tcp_port)
    os.makedirs(args.state_dir, exist_ok=True)
    huge_dir = huge_pages_dir(args.huge_pages, args.state_dir)  # first: no thread may run yet (unshare)
    socket_path = os.path.abspath(args.socket or os.path.join(args.state_dir, "snapd.sock"))
    try:
        remove_stale_socket(socket_path)
    except VmmError as exc:
        raise CliError(str(exc)) from None
    config = DaemonConfig(state_dir=args.state_dir, pool_size=args.pool_size, max_spawning=args.max_spawning,
                          max_clones=args.max_clones, max_count=args.max_count, restore_timeout=args.restore_timeout,
                          lane=args.lane == "on", jail=args.jail, uid_range=args.uid_range,
                          clone_memory_mib=args.clone_memory_mib, clone_cpu_cgroups=args.clone_cpu_cgroups == "on",
                          huge_dir=huge_dir, import_roots=tuple(os.path.abspath(d) for d in args.import_root))
    try:
        daemon = Daemon(config, socket_path)
    except (DaemonConfigError, VmmError, PoolError) as exc:  # a setting, a jail step or the zygote: one line
        raise CliError(str(exc)) from None
    servers = []
    try:
        limits = Limits(max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                        request_timeout=args.request_timeout, max_inflight=args.max_inflight)
        servers.append(serve_unix_socket(socket_path, daemon, gid, limits))  # the API starts VMs: owner and group
        if args.tcp_port is not None:
            try:  # one set of connections and limits for both listeners
                servers.append(SnapdTcpServer(args.tcp_port, daemon, token, connections=servers[0].connections))
            except OSError as exc:
                raise CliError(f"--tcp-port {args.tcp_port}: cannot listen on 127.0.0.1: {exc.strerror}") from None
        return _loop(servers, socket_path)
    except VmmError as exc:
        raise CliError(str(exc)) from None
    finally:
        for server in servers:
            server.server_close()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        daemon.close()


def _loop(servers, socket_path: str) -> int:
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stopping = []
    previous = {sig: signal.signal(sig, lambda *_: stopping.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
    old_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    print(f"snapd: serving on {socket_path}", flush=True)
    try:
        with selectors.DefaultSelector() as selector:
            for server in servers:
                selector.register(server.socket, selectors.EVENT_READ, server)
            selector.register(wake_read, selectors.EVENT_READ, None)
            while not stopping:
                for key, _ in selector.select():
                    if key.data is None:
                        try:
                            while os.read(wake_read, 512):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        key.data._handle_request_noblock()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_read)
        os.close(wake_write)
    return 0
