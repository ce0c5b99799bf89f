"""Run generated Python against ``assert`` tests in a separate, resource-limited process (mbpp pass@1).

``run_tests(code, setup_code, tests)`` returns ``{"passed", "error", "detail", "output", "isolation"}``
with ``error`` one of ``None``, ``"syntax"``, ``"assertion"``, ``"exception"``, ``"timeout"``,
``"memory"``.

**What this is and is not.** It guards the evaluating process and the machine against *accidents* of
model-written code — an infinite loop, a memory or fork bomb, a stray file write, a network call — not
against code written to escape. Nothing here is a security boundary against a determined attacker:
the child runs as an ordinary process on the same kernel and file system, and it can read by absolute
path any file its user may read (the repository included; started as root: every file, see below).
Run untrusted code in a container or VM. POSIX only (rlimits, sessions); the namespaces are Linux's.

How one run goes:

1. **Syntax first, in the parent, without executing anything**: ``compile(code, ...)`` only. A syntax
   error is reported as ``error="syntax"`` and no process is started.
2. The program ``code + setup_code + tests`` is written to a fresh temporary directory, which becomes
   the child's working directory and is deleted afterwards, with everything the code wrote there.
3. The child is a fresh ``python -I -S`` (isolated mode: no ``PYTHON*`` variables, neither the script's
   nor the user's directory on ``sys.path``; no site-packages) with an almost empty environment, stdin
   from ``/dev/null``, stdout/stderr to files in the temporary directory (read back truncated), in a
   new session so that the whole process group can be killed.
4. Before running any generated code the child, which is a single-threaded fresh interpreter, confines
   itself (done there rather than in ``preexec_fn``, which is unsafe in a multi-threaded parent such
   as one running torch):

   * **network**: ``unshare(CLONE_NEWNET)`` through libc (a new, empty network namespace: even
     127.0.0.1 is unreachable); if not permitted, ``CLONE_NEWUSER | CLONE_NEWNET`` (unprivileged user
     namespaces); if neither works, ``socket.socket``/``create_connection``/``getaddrinfo`` are replaced
     by functions that raise — which code importing ``_socket`` directly would get around.
   * **rlimits**: ``RLIMIT_AS`` = ``memory_mb`` (allocation fails with ``MemoryError``),
     ``RLIMIT_CPU`` = ``ceil(timeout)`` s, ``RLIMIT_FSIZE`` = 1 MB per file written (stdout included),
     ``RLIMIT_NOFILE`` = 64, ``RLIMIT_NPROC`` = ``max_processes``, no core files.
   * **as root, drop to ``nobody``**: the kernel never applies ``RLIMIT_NPROC`` to uid 0, so a root
     child switches to uid/gid 65534 (no supplementary groups). It keeps one capability,
     ``CAP_DAC_READ_SEARCH`` (read any file), because the interpreter may live somewhere ``nobody``
     cannot read (``/root/.pyenv``) and the tests' ``import``s must keep working; it loses the right to
     write anywhere but world-writable places and its own directory. ``PR_SET_NO_NEW_PRIVS`` is set.

5. A wall-clock timeout (``timeout`` s) kills the whole process group (``SIGKILL``); the group is
   killed after every run anyway, so forked children do not outlive it (one that calls ``setsid``
   could; with ``RLIMIT_NPROC`` there are few of them).

Classification: the child reports its own outcome through a pipe: ``AssertionError`` → ``"assertion"``,
``MemoryError`` → ``"memory"``, any other exception (``SystemExit`` too: a program that exits before
its asserts has not passed them) → ``"exception"``; killed by the wall clock or the CPU limit →
``"timeout"``. The generated code runs with ``__name__ == "__sandbox__"``, so its
``if __name__ == "__main__":`` blocks (often ``input()`` demos) do not run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ERRORS = ("syntax", "assertion", "exception", "timeout", "memory")  # the values of result["error"] besides None
NOBODY = 65534
FSIZE_BYTES = 1 << 20  # per file the child writes, stdout and stderr included
MAX_OUTPUT = 2000  # characters of stdout/stderr and of error details kept in the result
_NET_MODE = "auto"  # "auto": namespaces, else socket patch; "patch": socket patch only (tests)

# Runs in the child as ``python -I -S -c _RUNNER fd memory_mb cpu_s fsize nofile nproc net_mode``.
_RUNNER = r'''
import ctypes, json, os, resource, signal, sys, traceback

fd, mem_mb, cpu_s, fsize, nofile, nproc = (int(a) for a in sys.argv[1:7])
net_mode = sys.argv[7]
libc = ctypes.CDLL(None, use_errno=True)
def sys_call(name, *args):  # -1 where libc lacks the call (not Linux)
    f = getattr(libc, name, None)
    return -1 if f is None else f(*args)
CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x10000000

network, pidns = "socket-patch", False
if net_mode == "auto":
    for flags, name in ((CLONE_NEWNET | CLONE_NEWPID, "netns"), (CLONE_NEWNET, "netns"),
                        (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, "userns+netns"),
                        (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
        if sys_call("unshare", flags) == 0:
            network, pidns = name, bool(flags & CLONE_NEWPID)
            break

limits = {resource.RLIMIT_AS: mem_mb << 20, resource.RLIMIT_CPU: cpu_s, resource.RLIMIT_FSIZE: fsize,
          resource.RLIMIT_NOFILE: nofile, resource.RLIMIT_NPROC: nproc, resource.RLIMIT_CORE: 0}
for what, value in limits.items():
    hard = value + 1 if what == resource.RLIMIT_CPU else value  # SIGXCPU at the soft limit, SIGKILL 1 s later
    resource.setrlimit(what, (value, hard))

uid = os.getuid()
if os.geteuid() == 0 and network != "userns+netns":
    # RLIMIT_NPROC does not apply to uid 0: become nobody, keeping only CAP_DAC_READ_SEARCH (read files).
    sys_call("prctl", 8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setuid
    os.setgroups([])
    os.setgid(%(nobody)d)
    os.setuid(%(nobody)d)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    data[0].effective = data[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH
    if sys_call("capset", ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    uid = os.getuid()
sys_call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if pidns:
    # The first child is init of the new PID namespace: when it ends, the kernel kills and reaps every
    # process it left behind (no zombies that would count against RLIMIT_NPROC for the next run).
    child = os.fork()
    if child:
        status = os.waitpid(child, 0)[1]
        os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError instead of killing

if network == "socket-patch":
    import socket
    def _no_network(*args, **kwargs):
        raise OSError(101, "network disabled in the lmoe sandbox")
    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _no_network()
    socket.socket, socket.create_connection, socket.getaddrinfo = _NoSocket, _no_network, _no_network

status = os.fdopen(fd, "w")
isolation = f"network={network} pidns={pidns} uid={uid} nproc<={nproc} as={mem_mb}MB cpu={cpu_s}s"
with open("program.py", encoding="utf-8") as f:
    source = f.read()
result = {"error": None, "detail": "", "isolation": isolation}
main_pid = os.getpid()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
except BaseException as e:
    kind = "assertion" if isinstance(e, AssertionError) else "memory" if isinstance(e, MemoryError) else "exception"
    try:
        detail = "".join(traceback.format_exception(e)[-3:])
    except BaseException:
        detail = repr(e)
    result = {"error": kind, "detail": detail[-%(max_output)d:], "isolation": isolation}
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException:
        pass
if os.getpid() == main_pid:  # a forked child that reaches this point reports nothing
    status.write(json.dumps(result))
    status.flush()
os._exit(0)
''' % {"nobody": NOBODY, "max_output": MAX_OUTPUT}


def check_syntax(source: str) -> str | None:
    """``None`` if ``source`` compiles, else a one-line description. Compiles only; never executes."""
    try:
        compile(source, "<generated>", "exec")
    except SyntaxError as e:
        return f"{type(e).__name__}: {e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError, OverflowError) as e:  # null bytes, absurd nesting
        return f"{type(e).__name__}: {e}"
    return None


def run_tests(code: str, setup_code: str = "", tests: list[str] | tuple[str, ...] = (), timeout: float = 10.0,
              memory_mb: int = 512, max_processes: int = 16) -> dict:
    """Run ``code``, then ``setup_code``, then each test line in a confined child process (see the module
    docstring). ``passed`` is true only when the whole program ran to its end without an exception."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter needs some), got {memory_mb}")
    bad = check_syntax(code)
    if bad is not None:
        return _result("syntax", bad)
    program = "\n".join([code, setup_code or "", *tests]) + "\n"
    bad = check_syntax(program)
    if bad is not None:
        return _result("syntax", f"in setup code or tests: {bad}")
    with tempfile.TemporaryDirectory(prefix="lmoe-sandbox-", ignore_cleanup_errors=True) as tmp:
        return _run_in(Path(tmp), program, timeout, memory_mb, max_processes)


def _run_in(tmp: Path, program: str, timeout: float, memory_mb: int, max_processes: int) -> dict:
    (tmp / "program.py").write_text(program, encoding="utf-8")
    if os.geteuid() == 0:
        os.chown(tmp, NOBODY, NOBODY)  # the child drops to nobody and works in here
    argv = [sys.executable, "-I", "-S", "-c", _RUNNER, "", str(memory_mb), str(math.ceil(timeout)),
            str(FSIZE_BYTES), "64", str(max_processes), _NET_MODE]
    env = {"LC_ALL": "C.UTF-8", "HOME": str(tmp), "TMPDIR": str(tmp)}
    read_fd, write_fd = os.pipe()
    argv[5] = str(write_fd)
    timed_out = False
    try:
        with open(tmp / ".stdout", "w+b") as out, open(tmp / ".stderr", "w+b") as err:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(write_fd,), start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
            os.set_blocking(read_fd, False)  # a leftover grandchild may still hold the write end
            report = _read_all(read_fd)
            output = _tail(out) + _tail(err)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if timed_out:
        return _result("timeout", f"wall-clock limit of {timeout:g} s reached", output)
    if report:
        status = json.loads(report)
        return _result(status["error"], status["detail"], output, status["isolation"])
    code = proc.returncode
    if code in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return _result("timeout", f"CPU-time limit of {math.ceil(timeout)} s reached (signal {-code})", output)
    return _result("exception", f"the program ended without reporting (exit status {code})", output)


def _result(error: str | None, detail: str = "", output: str = "", isolation: str = "") -> dict:
    return {"passed": error is None, "error": error, "detail": detail[-MAX_OUTPUT:], "output": output[-MAX_OUTPUT:],
            "isolation": isolation}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - MAX_OUTPUT))
    return f.read().decode("utf-8", errors="replace")
