"""The python tool's child: run with `python -I -c <this file's text>`, before the user's code.

It reads {"code", "workspace", "memory_bytes", "cpu_seconds", "file_bytes", "processes",
"os_layers", "report_fd"} as JSON on stdin, confines itself, then runs the code. Layers, each
applied when this kernel allows it:

1. resource limits: address space (memory), CPU seconds, file size, processes (the user's
   count now plus `processes`; the kernel does not apply that one to root);
2. a network namespace (unshare CLONE_NEWUSER|CLONE_NEWNET, or CLONE_NEWNET alone as root):
   no interface but a loopback that is down, so no socket reaches anything;
3. Landlock (Linux 5.13+): reads only in the workspace and the interpreter's own files (its
   prefixes and sys.path, /usr, /lib, a few /dev, /proc/self and /etc files), writes only in
   the workspace, both refused by the kernel; from ABI 4 TCP bind/connect too;
4. as root, where (1) sets no process limit: a seccomp filter failing fork, vfork and clone
   of a process (threads still start), so the code cannot start processes at all;
5. an audit hook (PEP 578) refusing sockets, reads and writes outside the places above, and
   new processes where no OS layer contains them (the hook is not inherited). The hook is
   not a security boundary (ctypes can get around it); 2, 3 and 4 are.

Nothing here may import sorai: the child runs isolated (-I), outside the package. It writes the
names of the layers it got, space-separated, to the file descriptor `report_fd` (and as
"sandbox: <layers>" on stderr when asked by SORAI_SANDBOX_REPORT=1).
"""

import ctypes
import json
import os
import pwd
import resource
import sys

_config = json.loads(sys.stdin.read())
_workspace = os.path.realpath(_config["workspace"])
_layers = []
# Before the user namespace, where the uid reads as nobody: root is what the kernel exempts
# from RLIMIT_NPROC, by its real uid.
_root = os.getuid() == 0


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
    # kernel does not apply it to root (layer 4 does the job there).
    (resource.RLIMIT_NPROC, _user_tasks() + _config["processes"]),
    (resource.RLIMIT_CPU, _config["cpu_seconds"]),
    (resource.RLIMIT_FSIZE, _config["file_bytes"]),
):
    _soft, _hard = resource.getrlimit(_limit)
    _value = _value if _hard == resource.RLIM_INFINITY else min(_value, _hard)
    resource.setrlimit(_limit, (_value, _value))
_layers.append("rlimits")

# What the interpreter needs to read besides its prefixes and sys.path: shared libraries, time
# zones, CPU facts numpy and BLAS look up, and this process's own /proc entry.
_SYSTEM_READS = (
    "/usr", "/lib", "/lib32", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime",
    "/etc/mime.types", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/proc/self",
    "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu",
)  # fmt: skip


def _read_roots() -> list:
    """The directories and files outside the workspace the code may read."""
    try:
        home = os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        home = "/"
    candidates = [
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)), *sys.path, *_SYSTEM_READS,
    ]  # fmt: skip
    roots = set()
    for candidate in candidates:
        if not candidate or not os.path.isabs(candidate):
            continue  # not a place (an import hook's name in sys.path)
        full = os.path.realpath(candidate)
        # "/", the home directory or one above it would open what this layer is for: a
        # Python installed in ~/.pyenv is its own directory, not the home.
        if full == "/" or full == home or home.startswith(full.rstrip("/") + "/"):
            continue
        if os.path.exists(full):
            roots.add(full)
    return sorted(roots)


_reads = _read_roots()

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWUSER, _CLONE_NEWNET, _CLONE_THREAD = 0x10000000, 0x40000000, 0x00010000
_os_layers = _config["os_layers"]  # False: what a kernel allowing none of 2-4 gets (tests)
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
    read = 1 << 0 | 1 << 2 | 1 << 3  # EXECUTE, READ_FILE, READ_DIR
    # Every right that changes the filesystem.
    write = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
    if abi >= 2:
        write |= 1 << 13  # REFER: moving files across directories
    if abi >= 3:
        write |= 1 << 14  # TRUNCATE
    handled = read | write
    on_files = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 14  # the rights a rule on a file may grant
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no port allowed
    scoped = 0b1 if abi >= 6 else 0  # abstract unix sockets outside this sandbox

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    ruleset = Ruleset(handled, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = syscall(444, ctypes.byref(ruleset), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return False
    rules = [(_workspace, handled), ("/dev/null", read | 1 << 1 | 1 << 14)]
    rules += [(path, read) for path in _reads]
    for path, allowed in rules:
        try:
            parent = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # gone since it was listed
        if not os.path.isdir(path):
            allowed &= on_files
        rule = PathBeneath(allowed & handled, parent)
        added = syscall(445, fd, 1, ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(parent)
        if added != 0:
            os.close(fd)
            return False
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which Landlock requires
        return False
    return syscall(446, fd, ctypes.c_uint32(0)) == 0


# The syscalls that make a process, per architecture: (AUDIT_ARCH, clone, clone3, others).
_PROCESS_CALLS = {
    "x86_64": (0xC000003E, 56, 435, (57, 58)),  # fork, vfork
    "aarch64": (0xC00000B7, 220, 435, ()),
}


def _no_processes() -> bool:
    """A seccomp filter: fork, vfork and clone without CLONE_THREAD fail with EPERM, clone3
    with ENOSYS (glibc then falls back to clone, so threads still start), any other ABI
    (i386's int 0x80, x32) with EPERM."""
    machine = os.uname().machine
    if machine not in _PROCESS_CALLS:
        return False
    arch, clone, clone3, others = _PROCESS_CALLS[machine]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    # (code, jump-if-true label, jump-if-false label, k): labels resolved below.
    program = [
        (ld, None, None, 4),  # seccomp_data.arch
        (jeq, None, "deny", arch),
        (ld, None, None, 0),  # seccomp_data.nr
        *([(jge, "deny", None, 0x40000000)] if machine == "x86_64" else []),  # x32
        *[(jeq, "deny", None, nr) for nr in others],
        (jeq, "nosys", None, clone3),
        (jeq, "clone", None, clone),
        (ret, None, None, allow),
        ("clone", ld, None, None, 16),  # args[0], the flags (low 32 bits)
        (jset, None, "deny", _CLONE_THREAD),
        (ret, None, None, allow),
        ("deny", ret, None, None, eperm),
        ("nosys", ret, None, None, enosys),
    ]
    labels = {}
    lines = []
    for i, line in enumerate(program):
        if isinstance(line[0], str):
            labels[line[0]] = i
            line = line[1:]
        lines.append(line)

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    def offset(label, i):
        return 0 if label is None else labels[label] - i - 1

    filters = (Filter * len(lines))(
        *(Filter(code, offset(t, i), offset(f, i), k) for i, (code, t, f, k) in enumerate(lines))
    )
    fprog = Program(len(lines), filters)
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which seccomp requires
        return False
    return _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # SECCOMP_MODE_FILTER


try:
    if _os_layers and _landlock():
        _layers.append("landlock")
except (OSError, AttributeError):
    pass
try:
    if _os_layers and _root and _no_processes():
        _layers.append("no-processes")
except (OSError, AttributeError):
    pass

_os_confined = "netns" in _layers or "landlock" in _layers
if not _os_confined:
    # A process started would run without the hook, which is all there is here.
    _spawn_refused = "no OS sandbox on this machine"
elif "no-processes" in _layers:
    _spawn_refused = "running as root, where no process limit applies"
elif _root:
    _spawn_refused = "running as root, where no process limit applies, and no seccomp here"
else:
    _spawn_refused = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_realpath = os.path.realpath
_fspath = os.fspath
_sep = os.sep


def _full(path):
    try:
        return _realpath(_fspath(path) if not isinstance(path, bytes) else path.decode())
    except (TypeError, ValueError, UnicodeDecodeError):
        return None


def _under(full, roots) -> bool:
    return any(full == root or full.startswith(root + _sep) for root in roots)


_write_roots = (_workspace, "/dev/null")
_read_roots_all = (_workspace, *_reads)


def _may_write(path) -> bool:
    if isinstance(path, int):
        return True  # an fd already open
    full = _full(path)
    return full is not None and (full in _write_roots or _under(full, (_workspace,)))


def _may_read(path) -> bool:
    if isinstance(path, int):
        return True
    full = _full(path)
    return full is not None and _under(full, _read_roots_all)


_CHANGES = {
    "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
}  # fmt: skip
_LISTINGS = {"os.listdir", "os.scandir"}
_SPAWNS = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "pty.spawn",
}  # fmt: skip


def _hook(event, args):
    if event.startswith("socket.") and event != "socket.gethostname":
        raise PermissionError(f"the python tool has no network ({event} refused)")
    if event == "open":
        path, mode, flags = args
        if path is None:
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writing and not _may_write(path):
            raise PermissionError(f"the python tool may only write in the workspace: {path}")
        if not writing and not _may_read(path):
            raise PermissionError(
                f"the python tool may only read the workspace and Python's own files: {path}"
            )
    elif event in _LISTINGS:
        if args and args[0] is not None and not _may_read(args[0]):
            raise PermissionError(
                f"the python tool may only read the workspace and Python's own files: {args[0]}"
            )
    elif event in _CHANGES:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _may_write(path):
                raise PermissionError(f"the python tool may only change the workspace: {path}")
    elif event in _SPAWNS and _spawn_refused:
        raise PermissionError(f"the python tool may not start processes here ({_spawn_refused})")


sys.addaudithook(_hook)
_layers.append("audit-hook")
_report_fd = _config.get("report_fd")
if _report_fd is not None:
    try:
        os.write(_report_fd, " ".join(_layers).encode())
    finally:
        os.close(_report_fd)  # not inherited by what the code starts
if os.environ.get("SORAI_SANDBOX_REPORT") == "1":
    print("sandbox: " + " ".join(_layers), file=sys.stderr, flush=True)
del _config["workspace"]
_code = compile(_config.pop("code"), "<python tool>", "exec")
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
exec(_code, _globals)
