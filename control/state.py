"""xlb's own state: what a restart of `xlb up` must find again and no file of
the operator holds. Which file the instance serves, the config it runs (as
canonical TOML), the server states set at run time (`xlb server drain`,
`disable`), the ids of the servers' backend entries, the HA role (`xlb ha
role`) and the routing table of its VIP routes (`--announce-table`): after a
crash, the next `xlb up` or `xlb down` withdraws them there.

One directory per network namespace, `/var/lib/xlb/netns-<inode of its
/proc/self/ns/net>` (`$XLB_STATE_DIR` replaces `/var/lib/xlb`), holding one
JSON file written atomically (and `xlb ha follow`'s record of keepalived's
last word, for the follow that a reload of keepalived starts). The kernel reuses the inode numbers of deleted
namespaces, so the file also records the namespace's cookie (unique while the
machine runs) and the boot: a state left by an earlier namespace of this boot
is not this namespace's, and load() ignores it. After a reboot the cookies are
new; the state is taken if its namespace had the name this one has
(`ip netns`; none, the root namespace's, which keeps its inode across boots):
namespaces made anew get inodes in the order they are made.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import log
from .ha import ROLES, check_table

ROOT = "/var/lib/xlb"
FILE = "state.json"
FOLLOWED = "keepalived.json"   # `xlb ha follow`'s: the role keepalived asked for
SO_NETNS_COOKIE = 71      # Linux 5.14; Python's socket module does not name it


@dataclass(frozen=True)
class State:
    config_path: str | None           # the file the instance serves; None: started from flags
    config_text: str                  # the canonical TOML of the config it runs
    admin: dict[tuple[str, str], str]  # (pool, server) -> "drain" | "maint"
    role: str | None = None           # ha.ROLES; None in a state saved before xlb kept it
    announce_table: int | None = None  # None: announces nothing (or saved before xlb kept it)
    # The id of the config map of the data path this describes: an adopting
    # instance takes the rest for the running data path's only when it is that
    # one's. None: saved before xlb kept it.
    datapath: int | None = None
    # (pool, server) -> the id of its backend entry in the maps: a server in
    # two pools has an entry in each, at one address and port, which an
    # adopting instance tells apart by them. Empty: saved before xlb kept them.
    backends: dict[tuple[str, str], int] = field(default_factory=dict)


def namespace_dirname() -> str:
    """The name of this network namespace's directory, here and in ctl.RUN_DIR."""
    return f"netns-{os.stat('/proc/self/ns/net').st_ino}"


def directory() -> Path:
    return Path(os.environ.get("XLB_STATE_DIR", ROOT)) / namespace_dirname()


def _namespace() -> dict:
    """What tells this network namespace from an earlier one with the same inode.
    A kernel before 5.14 has no cookies: None, and there an earlier namespace of
    this boot with the same inode cannot be told from this one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            cookie = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                raise
            cookie = None
    return {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "cookie": cookie, "name": _netns_name()}


NETNS_NAMES = Path("/run/netns")        # where `ip netns add NAME` pins a namespace


def _netns_name() -> str | None:
    """The name `ip netns` gives this network namespace, or None (the root
    namespace, a container's, one that no name pins)."""
    own = os.stat("/proc/self/ns/net")
    try:
        names = sorted(os.listdir(NETNS_NAMES))
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(NETNS_NAMES / name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return name
    return None


def load() -> State | None:
    """This namespace's state, or None when it has none. A file that cannot be
    read or is no state, or a directory not this user's alone, is logged as a
    warning and taken as none: a damaged state must not keep the balancer from
    starting."""
    path = directory() / FILE
    try:
        raw = _read(FILE)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.event("state", level="warning", file=path, error=e.strerror)
        return None
    try:
        d = json.loads(raw)
        ns = _namespace()
        saved = d["namespace"]
        if (saved["boot_id"] == ns["boot_id"] and ns["cookie"] is not None
                and saved["cookie"] != ns["cookie"]):
            # Said, as after a reboot: a bare `xlb up` points to it, and the
            # drain and maint states it held are not taken back.
            log.event("state", level="warning", file=path,
                      error="left by an earlier network namespace that had this one's inode "
                            "(deleted since), not this one; ignored")
            return None
        if saved["boot_id"] != ns["boot_id"] and saved.get("name", ns["name"]) != ns["name"]:
            # Namespaces made anew at boot get inodes in the order they are
            # made: one of another name may have this one's from before.
            log.event("state", level="warning", file=path,
                      error=f"left before the reboot by the network namespace "
                            f"{saved['name'] or '(no name)'}, not this one "
                            f"({ns['name'] or 'no name'}); ignored")
            return None
        admin = {(pool, server): value for pool, server, value in d["admin"]}
        backends = {(pool, server): i for pool, server, i in d.get("backends", [])}
        role, table, datapath = d.get("role"), d.get("announce_table"), d.get("datapath")
        if not (isinstance(d["config_path"], (str, type(None)))
                and isinstance(d["config_text"], str)
                and all(type(pool) is str and type(server) is str and v in ("drain", "maint")
                        for (pool, server), v in admin.items())
                and all(type(pool) is str and type(server) is str and type(i) is int
                        for (pool, server), i in backends.items())
                and role in (None, *ROLES)
                and (table is None or type(table) is int)
                and (datapath is None or type(datapath) is int)):
            raise ValueError("a field has the wrong type")
        return State(d["config_path"], d["config_text"], admin, role,
                     table if table is None else check_table(table), datapath, backends)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        # ValueError: also bytes that are not UTF-8; RecursionError: JSON nested past the stack
        why = (f"not UTF-8: {e.reason} at byte {e.start}" if isinstance(e, UnicodeDecodeError)
               else repr(e))
        log.event("state", level="warning", file=path, error=f"not an xlb state ({why}); ignored")
        return None


def save(state: State) -> None:
    """Replaces the state atomically (a crash leaves the old one or the new one)."""
    path = directory()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {"config_path": state.config_path, "config_text": state.config_text,
            "admin": [[pool, server, value] for (pool, server), value in sorted(state.admin.items())],
            "role": state.role, "announce_table": state.announce_table,
            "datapath": state.datapath,
            "backends": [[pool, server, i] for (pool, server), i in sorted(state.backends.items())],
            "namespace": _namespace()}
    _write(FILE, data)


def _read(name: str) -> bytes:
    """The state directory's file `name`, as bytes: what is not UTF-8 is json.loads's
    ValueError, a damaged state as any other (OSError if it or the directory cannot
    be read)."""
    dirfd = _open_directory()
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    finally:
        os.close(dirfd)
    with open(fd, "rb") as f:
        return f.read()


def _write(name: str, data) -> None:
    """Replaces the state directory's file `name` with data as JSON, atomically."""
    dirfd = _open_directory()
    try:
        tmp = f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=dirfd)
        try:
            with open(fd, "w") as f:
                # One line: json.dumps without an indent is the C encoder's; indented,
                # or by json.dump, the Python one's took 50 ms for 10,000 servers.
                f.write(json.dumps(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            # A full disk, say: the partial file goes, the old state stays.
            try:
                os.unlink(tmp, dir_fd=dirfd)
            except OSError:
                pass
            raise
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def save_followed(keepalived: str, role: str, running: bool = False) -> None:
    """Records the role that a keepalived process (`xlb ha follow`'s parent,
    named by `keepalived`) last asked for: reloading, keepalived ends its
    follow and starts another, and says no state to the new one. `running`:
    recorded by a follow that runs on, which re-records it when keepalived ends
    it; left so, its follow was killed alone, and keepalived may have said
    more since, to nobody (it held the node in FAULT)."""
    directory().mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(FOLLOWED, {"keepalived": keepalived, "role": role, "running": running})


def followed(keepalived: str) -> str | None:
    """The role that the keepalived process `keepalived` last asked for, as
    save_followed recorded it; None if it asked none (or another process did),
    or its follow was killed."""
    try:
        d = json.loads(_read(FOLLOWED))
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(d, dict) and d.get("keepalived") == keepalived and d.get("role") in ROLES \
            and not d.get("running"):
        return d["role"]
    return None


def _open_directory() -> int:
    """This namespace's state directory, opened; refused (OSError) unless it is
    a directory of this user that no one else may write. Another user's (in a
    directory anyone may create one in, as /tmp) could hold a symbolic link
    where xlb writes, which root would follow, or a forged state, which the
    next `xlb up` would serve."""
    return open_own(directory(), WRITABLE)


WRITABLE = 0o022          # alone, open_own: no one else may write it
PRIVATE = 0o077           # alone, open_own: no one else may enter it


def alone(st: os.stat_result, others: int) -> bool:
    """This user owns the file of st, and its mode has none of the bits `others`."""
    return st.st_uid == os.geteuid() and not st.st_mode & others


def open_own(path: Path, others: int) -> int:
    """The directory path, opened (not through a symbolic link); refused (OSError)
    unless this user owns it and its mode has none of the bits `others`. Opened
    once: what the checks saw is what is used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        # O_NOFOLLOW refuses a link as "Not a directory" (ELOOP on some systems),
        # which a link to one seems not to be: said as what it is.
        if e.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(path):
            raise OSError(e.errno, f"{path} is a symbolic link, which xlb does not follow") \
                from None
        raise
    st = os.fstat(fd)
    if not alone(st, others):
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} is not xlb's own: owned by uid {st.st_uid}, "
                                   f"mode {st.st_mode & 0o777:o}")
    return fd


def clear() -> bool:
    """Forgets this namespace's state: only in a directory that load() and
    save() would use (xlb's own, no symbolic link); any other is left as it
    is. Whether there was a state file to forget."""
    try:
        dirfd = _open_directory()
    except OSError:       # none, or not xlb's: nothing of xlb's to forget there
        return False
    try:
        os.unlink(FILE, dir_fd=dirfd)
        removed = True
    except FileNotFoundError:
        removed = False
    finally:
        os.close(dirfd)
    try:
        directory().rmdir()
    except OSError:       # gone already, or holds more than the state
        pass
    return removed
