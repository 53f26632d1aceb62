"""The workspace's walls: the file tools refuse paths that leave it, and the python tool's
process cannot write outside it, outlive its time limit or reach the network. The checks go
through the tools as the model would call them; they must hold whether or not this kernel
allows the OS layers (namespaces, Landlock), which only strengthen them."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
import uuid

import pytest
from PIL import Image

from sorai.apps.agent.files import Workspace, file_tools
from sorai.apps.agent.python_tool import MAX_CAPTURE, MAX_PROCESSES, python_tool, run_python
from sorai.apps.agent.tools import MAX_OBSERVATION


@pytest.fixture
def space(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "notes.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside")
    return Workspace(root)


@pytest.fixture(params=[True, False], ids=["os-layers", "audit-hook-only"])
def os_layers(request):
    """Both ways the sandbox may run: with what this kernel allows, and with the audit hook
    and resource limits alone (a kernel without namespaces or Landlock)."""
    return request.param


@pytest.fixture
def tools(space):
    return {t.name: t for t in file_tools(space)}


def test_file_tools_work_inside(tools, space):
    assert tools["write_file"]({"path": "sub/a.txt", "content": "hé"}).ok
    assert tools["read_file"]({"path": "sub/a.txt"}).output == "hé"
    assert tools["read_file"]({"path": str(space.root / "notes.txt")}).output == "inside"
    listing = tools["list_files"]({}).output
    assert "notes.txt\t6 bytes" in listing and "sub/a.txt\t3 bytes" in listing


@pytest.mark.parametrize("path", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd"])
def test_escapes_by_path_are_refused(tools, path):
    for name, arguments in (
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "x"}),
        ("list_files", {"path": os.path.dirname(path) or "/"}),
    ):
        result = tools[name](arguments)
        assert not result.ok and "outside the workspace" in result.output, (name, path)


def test_escapes_by_symlink_are_refused(tools, space, tmp_path):
    (space.root / "link.txt").symlink_to(tmp_path / "secret.txt")
    (space.root / "door").symlink_to(tmp_path)
    for name, arguments in (
        ("read_file", {"path": "link.txt"}),
        ("write_file", {"path": "link.txt", "content": "x"}),
        ("read_file", {"path": "door/secret.txt"}),
        ("write_file", {"path": "door/new.txt", "content": "x"}),
        ("list_files", {"path": "door"}),
    ):
        result = tools[name](arguments)
        assert not result.ok and "outside the workspace" in result.output, name
    assert (tmp_path / "secret.txt").read_text() == "outside"
    assert not (tmp_path / "new.txt").exists()


def test_python_runs_in_the_workspace(space, os_layers):
    run = run_python(
        "print(open('notes.txt').read()); open('out.txt', 'w').write('ok')",
        space,
        os_layers=os_layers,
    )
    assert run.returncode == 0 and run.stdout == "inside\n"
    assert (space.root / "out.txt").read_text() == "ok"


@pytest.mark.parametrize("target", ["/tmp/sorai-agent-escape-{}", "../escape-{}"])
def test_python_cannot_write_outside_the_workspace(space, os_layers, target):
    path = target.format(os.getpid())
    code = f"open({path!r}, 'w').write('x')"
    run = run_python(code, space, os_layers=os_layers)
    assert run.returncode != 0 and "PermissionError" in run.stderr
    assert not (space.root / path).exists() and not os.path.exists(path)


@pytest.mark.parametrize(
    "code",
    [
        "print(open('../secret.txt').read())",
        "print(open('/etc/passwd').read())",
        "import os; print(os.listdir('/'))",
        # HOME is the workspace: one level up is outside
        "import pathlib; print(pathlib.Path('~/../secret.txt').expanduser().read_text())",
    ],
)
def test_python_cannot_read_outside_the_workspace(space, os_layers, code):
    run = run_python(code, space, os_layers=os_layers)
    assert run.returncode != 0 and "may only read the workspace" in run.stderr, run.observation()
    assert "outside" not in run.stdout and "root:" not in run.stdout


def test_python_still_reads_its_own_files(space, os_layers):
    # The interpreter's prefix, site-packages and system libraries stay readable: imports of
    # C extensions with their bundled libraries work, and so does /proc/self.
    code = (
        "import json, numpy, PIL.Image\n"
        "print(int(numpy.arange(4).sum()), open('notes.txt').read())\n"
        "print(open('/proc/self/status').readline().split()[0])"
    )
    run = run_python(code, space, os_layers=os_layers)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["6", "inside", "Name:"]


def test_the_read_walls_hold_without_the_audit_hook(space, tmp_path):
    """Landlock's read rules: a raw open(2) through ctypes, which the audit hook never sees,
    fails outside the workspace and Python's files (and works inside)."""
    layers = run_python("pass", space).sandbox
    if "landlock" not in layers:
        pytest.skip(f"this kernel does not allow Landlock ({layers})")
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"print(libc.open({str(tmp_path / 'secret.txt').encode()!r}, 0),"
        " libc.open(b'/etc/passwd', 0), libc.open(b'notes.txt', 0) >= 0)"
    )
    run = run_python(code, space)
    assert run.stdout.split() == ["-1", "-1", "True"], run.observation()


def test_the_result_says_which_confinement_held(space, os_layers):
    run = run_python("print('hi')", space, os_layers=os_layers)
    layers = run.sandbox.split()
    assert layers[0] == "rlimits" and layers[-1] == "audit-hook"
    if not os_layers:
        assert layers == ["rlimits", "audit-hook"]
    assert run.observation() == f"stdout:\nhi\n\n[sandbox: {run.sandbox}]"
    if os_layers:  # what the model sees from the tool itself
        assert python_tool(space)({"code": "print(1)"}).output.endswith(f"[sandbox: {run.sandbox}]")


def test_python_is_killed_at_its_time_limit(space, os_layers):
    started = time.monotonic()
    run = run_python("while True:\n    pass", space, seconds=1.0, os_layers=os_layers)
    assert run.timed_out and run.returncode is None
    assert time.monotonic() - started < 30
    assert "killed" in run.observation()


def test_python_children_die_with_it(space):
    # With the OS layers processes may be started (they inherit the confinement); a child
    # that outlives its parent still goes, as the whole process group is killed.
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "while True: pass"
    )
    run = run_python(code, space, seconds=2.0)
    if "may not start processes" in run.stderr:
        pytest.skip(f"no process may be started here ({run.sandbox})")
    assert run.timed_out


def _detach(then: str) -> tuple[str, str]:
    """Code whose forked child leaves the process group (setsid) and then execs a sleeper
    with a unique marker in its argv; the parent then does `then`. And the marker."""
    marker = f"sleeper-{uuid.uuid4().hex}"
    code = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)',"
        f" {marker!r}])\n"
        f"{then}\n"
    )
    return code, marker


def _alive(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_child_that_leaves_the_group_is_killed_and_does_not_hang_the_tool(space):
    # setsid() takes the grandchild out of the killed group while it holds the output pipes.
    # Run in a thread, so that a hang fails the test instead of blocking it.
    code, marker = _detach("while True: pass")
    runs = []
    worker = threading.Thread(target=lambda: runs.append(run_python(code, space, seconds=1.0)))
    worker.start()
    worker.join(timeout=90)
    assert not worker.is_alive(), "run_python hung on a detached grandchild's pipes"
    if "may not start processes" in runs[0].stderr:
        return  # no OS layers here: processes are refused outright
    assert runs[0].timed_out
    assert not _alive(marker), "the detached grandchild outlived the run"


def test_a_daemon_left_behind_is_killed_after_a_normal_exit(space):
    code, marker = _detach("print('parent done')")
    run = run_python(code, space, seconds=60.0)
    if "may not start processes" in run.stderr:
        return
    assert not run.timed_out  # it did not wait for the daemon (60 s is ample)
    assert "parent done" in run.stdout
    assert not _alive(marker), "the daemon outlived the run"


def test_python_without_os_layers_may_not_start_processes(space):
    # A child would run without the audit hook, so where the hook is all there is: refused.
    run = run_python("import os; os.system('true')", space, os_layers=False)
    assert run.returncode != 0 and "may not start processes" in run.stderr


def test_python_cannot_open_a_network_socket(space, os_layers):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "print('connected')"
        )
        run = run_python(code, space, os_layers=os_layers)
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing got through
    assert "connected" not in run.stdout and run.returncode != 0


def test_python_memory_is_limited(space, os_layers):
    run = run_python("x = bytearray(3 * 1024**3)", space, memory_mb=512, os_layers=os_layers)
    assert run.returncode != 0 and "MemoryError" in run.stderr


def test_the_os_layers_hold_without_the_audit_hook(space, tmp_path):
    """Where this kernel allows Landlock and network namespaces, writes and connections made
    below Python's audit hook (raw syscalls through ctypes) fail too."""
    layers = run_python("pass", space, report=True).stderr
    if "landlock" not in layers or "netns" not in layers:
        pytest.skip(f"this kernel does not allow the OS layers ({layers.strip()})")
    target = tmp_path / "raw.txt"
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"print(libc.open({str(target).encode()!r}, 0o101, 0o644))\n"  # O_WRONLY | O_CREAT
    )
    run = run_python(code, space)
    assert run.stdout.strip() == "-1" and not target.exists()


def test_python_output_flooding_is_bounded_in_the_parent(space):
    # A loop printing forever until the kill: the parent keeps the last MAX_CAPTURE bytes, not
    # the gigabytes written (communicate() kept them all, ~10 GB in four seconds).
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    run = run_python(code, space, seconds=2.0)
    assert run.timed_out
    assert MAX_CAPTURE <= len(run.stdout) < MAX_CAPTURE + 100
    assert run.stdout.startswith("[") and "bytes before this cut]" in run.stdout
    assert "killed" in run.observation()


def test_python_gets_no_secrets_and_no_stdin(space, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-parent-secret")
    code = "import os, sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))"
    run = run_python(code, space)
    assert run.returncode == 0, run.stderr
    assert "OPENAI_API_KEY" not in run.stdout and "sk-parent-secret" not in run.stdout
    assert run.stdout.splitlines()[-1] == "''"


def test_python_has_a_process_limit(space):
    code = "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    run = run_python(code, space)
    assert run.returncode == 0, run.stderr
    limit = int(run.stdout)
    assert limit != resource.RLIM_INFINITY and limit > MAX_PROCESSES


def test_a_fork_bomb_stops_at_the_process_limit(space):
    # fork() through ctypes, below the audit hook, so that the OS's limit is what stops it:
    # RLIMIT_NPROC for a user, and for root (whom the kernel exempts from it) the seccomp
    # filter, which fails the first fork.
    code = (
        "import ctypes, os, time\n"
        "fork = ctypes.CDLL(None, use_errno=True).fork\n"
        "n = 0\n"
        "for _ in range(5000):\n"
        "    pid = fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "    if pid < 0:\n"
        "        print('stopped after', n)\n"
        "        break\n"
        "    n += 1\n"
    )
    run = run_python(code, space, seconds=20.0)
    assert "stopped after" in run.stdout, run.observation()
    if os.getuid() == 0:
        assert "no-processes" in run.sandbox and run.stdout.split() == ["stopped", "after", "0"]


def test_read_file_refuses_binary_files_and_bounds_huge_ones(tools, space):
    (space.root / "blob.bin").write_bytes(bytes(range(256)) * 8)
    result = tools["read_file"]({"path": "blob.bin"})
    assert not result.ok and "binary file (2048 bytes)" in result.output
    Image.new("RGB", (4, 4)).save(space.root / "pic.png")
    assert "describe_image" in tools["read_file"]({"path": "pic.png"}).output
    (space.root / "latin1.txt").write_bytes("é".encode("latin-1") * 100)
    assert "not UTF-8 text" in tools["read_file"]({"path": "latin1.txt"}).output
    (space.root / "big.txt").write_text("line\n" * 2_000_000)  # 10 MB
    result = tools["read_file"]({"path": "big.txt"})
    assert result.ok and "the file has 10000000 bytes; this is its beginning" in result.output
    assert len(result.output) < MAX_OBSERVATION + 100


def test_read_file_refuses_what_is_not_a_regular_file(tools, space):
    os.mkfifo(space.root / "pipe")  # opened as a file, it would block the tool forever
    result = tools["read_file"]({"path": "pipe"}, timeout=20)
    assert not result.ok and "not a regular file" in result.output


@pytest.mark.parametrize(
    ("path", "lands"),
    [
        ("sub/../notes.txt", "notes.txt"),
        ("~/notes.txt", "~/notes.txt"),  # no home expansion: a name inside
        ("sub\\..\\..\\x.txt", "sub\\..\\..\\x.txt"),  # a backslash is part of a name here
    ],
)
def test_odd_paths_stay_inside(tools, space, path, lands):
    assert tools["write_file"]({"path": path, "content": "hi"}).ok
    assert (space.root / lands).read_text() == "hi"


def test_absolute_paths_inside_and_bad_names_are_handled(tools, space):
    inside = str(space.root / "notes.txt")
    assert tools["read_file"]({"path": inside}).output == "inside"
    assert "invalid path" in tools["read_file"]({"path": "a\x00b"}).output
    long = tools["write_file"]({"path": "n" * 300, "content": "x"})
    assert not long.ok and "File name too long" in long.output
    (space.root / "adir").mkdir()
    assert not tools["write_file"]({"path": "adir", "content": "x"}).ok
    assert "is a directory" in tools["read_file"]({"path": "adir"}).output


def test_a_traceback_behind_long_output_reaches_the_model(space):
    python = python_tool(space)
    code = "for i in range(5000):\n    print(i)\nraise RuntimeError('the real problem')"
    result = python({"code": code})
    assert "RuntimeError: the real problem" in result.output  # stderr's end kept
    assert "\n4999\n" in result.output and len(result.output) <= MAX_OBSERVATION
