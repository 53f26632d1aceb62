"""The python tool's child: run with `python -I -c <this file's text>`, before the user's code.

It reads {"code", "workspace", "memory_bytes", "cpu_seconds", "file_bytes", "processes",
"os_layers"} as JSON on stdin, confines itself, then runs the code. Layers, each applied when
this kernel allows it:

1. resource limits: address space (memory), CPU seconds, file size, processes (the user's
   count now plus `processes`; root is exempt from that one);
2. a network namespace (unshare CLONE_NEWUSER|CLONE_NEWNET, or CLONE_NEWNET alone as root):
   no interface but a loopback that is down, so no socket reaches anything;
3. Landlock (Linux 5.13+): writes anywhere but the workspace refused by the kernel, and from
   ABI 4 TCP bind/connect too;
4. an audit hook (PEP 578) refusing sockets, opens for writing and file changes outside the
   workspace, and, when neither 2 nor 3 is in place, new processes (which would run without the
   hook). The hook is not a security boundary (ctypes can get around it); 2 and 3 are.

Nothing here may import sorai: the child runs isolated (-I), outside the package. It prints one
line "sandbox: <layers>" on stderr when asked by SORAI_SANDBOX_REPORT=1.
"""

import ctypes
import json
import os
import resource
import sys

_config = json.loads(sys.stdin.read())
_workspace = os.path.realpath(_config["workspace"])
_layers = []


def _user_tasks() -> int:
    """Processes and threads of this real uid: what RLIMIT_NPROC counts."""
    count, uid = 0, str(os.getuid())
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if status.get("Uid", "").split()[:1] == [uid]:
            count += int(status.get("Threads", "1").strip() or 1)
    return count


for _limit, _value in (
    (resource.RLIMIT_AS, _config["memory_bytes"]),
    # The user's tasks now, plus the few the code may start: a fork bomb stops there. The
    # kernel does not apply it to root.
    (resource.RLIMIT_NPROC, _user_tasks() + _config["processes"]),
    (resource.RLIMIT_CPU, _config["cpu_seconds"]),
    (resource.RLIMIT_FSIZE, _config["file_bytes"]),
):
    _soft, _hard = resource.getrlimit(_limit)
    _value = _value if _hard == resource.RLIM_INFINITY else min(_value, _hard)
    resource.setrlimit(_limit, (_value, _value))
_layers.append("rlimits")

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_os_layers = _config["os_layers"]  # False: what a kernel allowing neither gets (tests)
if _os_layers and (
    _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0 or _libc.unshare(_CLONE_NEWNET) == 0
):
    _layers.append("netns")


def _landlock() -> bool:
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._CREATE_RULESET_VERSION
    if abi < 1:
        return False
    # Every right that changes the filesystem (reads and execution stay unrestricted).
    write = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
    if abi >= 2:
        write |= 1 << 13  # REFER: moving files across directories
    if abi >= 3:
        write |= 1 << 14  # TRUNCATE
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no port allowed
    scoped = 0b1 if abi >= 6 else 0  # abstract unix sockets outside this sandbox

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    ruleset = Ruleset(write, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = syscall(444, ctypes.byref(ruleset), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return False
    null = 1 << 1 | (1 << 14 if abi >= 3 else 0)  # WRITE_FILE, TRUNCATE
    for path, allowed in ((_workspace, write), ("/dev/null", null)):
        parent = os.open(path, os.O_PATH)
        rule = PathBeneath(allowed, parent)
        if syscall(445, fd, 1, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            return False
        os.close(parent)
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which Landlock requires
        return False
    return syscall(446, fd, ctypes.c_uint32(0)) == 0


try:
    if _os_layers and _landlock():
        _layers.append("landlock")
except (OSError, AttributeError):
    pass

_os_confined = "netns" in _layers or "landlock" in _layers
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_realpath = os.path.realpath
_fspath = os.fspath


def _inside(path) -> bool:
    if isinstance(path, int):
        return True  # an fd already open
    try:
        full = _realpath(_fspath(path) if not isinstance(path, bytes) else path.decode())
    except (TypeError, ValueError, UnicodeDecodeError):
        return False
    return full == _workspace or full.startswith(_workspace + os.sep) or full == "/dev/null"


_CHANGES = {
    "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
}  # fmt: skip
_SPAWNS = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "pty.spawn",
}  # fmt: skip


def _hook(event, args):
    if event.startswith("socket.") and event != "socket.gethostname":
        raise PermissionError(f"the python tool has no network ({event} refused)")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"the python tool may only write in the workspace: {path}")
    elif event in _CHANGES:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"the python tool may only change the workspace: {path}")
    elif event in _SPAWNS and not _os_confined:
        raise PermissionError("the python tool may not start processes here (no OS sandbox)")


sys.addaudithook(_hook)
_layers.append("audit-hook")
if os.environ.get("SORAI_SANDBOX_REPORT") == "1":
    print("sandbox: " + " ".join(_layers), file=sys.stderr, flush=True)
del _config["workspace"]
_code = compile(_config.pop("code"), "<python tool>", "exec")
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
exec(_code, _globals)
