"""lmoe.sandbox: each kind of accident generated code can cause, and what the sandbox makes of it."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from lmoe import sandbox
from lmoe.sandbox import check_syntax, run_tests

ADD = "def add(a, b):\n    return a + b\n"
REPO = Path(__file__).resolve().parents[1]


def test_passing_code_passes():
    r = run_tests(ADD, "", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (r["passed"], r["error"], r["detail"]) == (True, None, "")
    assert "network=" in r["isolation"] and "as=512MB" in r["isolation"]


def test_setup_code_runs_after_the_code_and_before_the_tests():
    r = run_tests(ADD, "OFFSET = add(1, 1)", ["assert add(OFFSET, 1) == 3"])
    assert r["passed"], r


def test_failing_assert_is_an_assertion_error_naming_the_test():
    r = run_tests(ADD, "", ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    assert (r["passed"], r["error"]) == (False, "assertion")
    assert "assert add(2, 2) == 5" in r["detail"] and "AssertionError" in r["detail"]


def test_other_exceptions_stdin_and_exit_are_failures():
    r = run_tests("def f():\n    return 1 / 0\n", "", ["assert f() == 1"])
    assert r["error"] == "exception" and "ZeroDivisionError" in r["detail"]
    r = run_tests("name = input()\n", "", [])  # stdin is /dev/null
    assert r["error"] == "exception" and "EOFError" in r["detail"]
    r = run_tests(ADD + "import sys\nsys.exit(0)\n", "", ["assert add(1, 2) == 4"])  # exits before its tests
    assert r["error"] == "exception" and "SystemExit" in r["detail"]
    r = run_tests(ADD + "if __name__ == '__main__':\n    raise SystemExit(input())\n", "", ["assert add(1, 1) == 2"])
    assert r["passed"]  # a __main__ block does not run


def test_syntax_error_is_found_without_running_anything(tmp_path, monkeypatch):
    target = tmp_path / "created.txt"
    tmp_path.chmod(0o777)  # writable even for the 'nobody' a root child becomes
    writes = f"open({str(target)!r}, 'w').write('ran')\n"
    assert run_tests(writes, "", [])["passed"] and target.read_text() == "ran"  # control: running it writes
    target.unlink()

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_process)
    r = run_tests(writes + "def broken(:\n    pass\n", "", ["assert True"])
    assert (r["passed"], r["error"]) == (False, "syntax")
    assert r["detail"] == "SyntaxError: invalid syntax (line 2)"
    assert not target.exists()
    r = run_tests(ADD, "", ["assert add(1, 2) == 3)"])  # broken tests are reported as such
    assert r["error"] == "syntax" and r["detail"].startswith("in setup code or tests: SyntaxError")
    assert check_syntax(ADD) is None and check_syntax("x = (\n") is not None
    assert check_syntax("x = 1\0") is not None  # a null byte: ValueError/SyntaxError, never a crash


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_tests("while True:\n    pass\n", "", [], timeout=1.0)
    elapsed = time.monotonic() - t0
    assert (r["passed"], r["error"]) == (False, "timeout")
    assert 1.0 <= elapsed < 3.0


def test_sleeping_program_times_out_on_the_wall_clock():
    t0 = time.monotonic()
    r = run_tests("import time\ntime.sleep(60)\n", "", [], timeout=1.0)
    assert r["error"] == "timeout" and time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("bomb", ["x = bytearray(4 * 10**9)\n", "x = [0] * 10**9\n",
                                  "x = []\nwhile True:\n    x.append(' ' * 10**6)\n"])
def test_memory_bomb_is_a_memory_error(bomb):
    r = run_tests(bomb, "", [], memory_mb=256)
    assert (r["passed"], r["error"]) == (False, "memory")
    assert "MemoryError" in r["detail"]


def test_network_is_blocked():
    r = run_tests("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n", "", [])
    assert r["error"] == "exception"
    if "network=socket-patch" in r["isolation"]:
        assert "network disabled in the lmoe sandbox" in r["detail"]
    else:  # an empty network namespace: not even loopback is up
        assert "Network is unreachable" in r["detail"] or "Errno 101" in r["detail"]


def test_network_fallback_patch_blocks_sockets(monkeypatch):
    monkeypatch.setattr(sandbox, "_NET_MODE", "patch")
    r = run_tests("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n", "", [])
    assert r["error"] == "exception" and "network disabled in the lmoe sandbox" in r["detail"]
    assert "network=socket-patch" in r["isolation"]
    r = run_tests("import socket\nsocket.socket()\n", "", [])
    assert r["error"] == "exception" and "network disabled" in r["detail"]


def test_the_repository_is_not_the_working_directory():
    assert (REPO / "lmoe" / "__init__.py").is_file()
    r = run_tests("open('lmoe/__init__.py').read()\n", "", [])
    assert r["error"] == "exception" and "FileNotFoundError" in r["detail"]
    r = run_tests("import lmoe\n", "", [])  # -I -S: neither the repo nor site-packages is importable
    assert r["error"] == "exception" and "ModuleNotFoundError" in r["detail"]


def test_files_written_go_to_a_temporary_directory_that_is_removed():
    code = ("import os\nopen('out.txt', 'w').write('x' * 10)\nprint(os.path.abspath('out.txt'))\n"
            "print(os.environ.get('PATH'), os.environ.get('PYTHONPATH'))\n")
    r = run_tests(code, "", ["assert open('out.txt').read() == 'x' * 10"])
    assert r["passed"], r
    written, env_line = r["output"].splitlines()
    written = Path(written)
    assert written.parent.name.startswith("lmoe-sandbox-")
    assert written.parent.parent == Path(tempfile.gettempdir()).resolve()
    assert not written.parent.exists()  # deleted afterwards, with what was written there
    assert env_line == "None None"  # a nearly empty environment


def test_output_is_captured_and_bounded():
    r = run_tests("print('hello')\nimport sys\nprint('oops', file=sys.stderr)\n", "", [])
    assert r["passed"] and r["output"] == "hello\noops\n"
    r = run_tests("while True:\n    print('y' * 1000)\n", "", [], timeout=5.0)  # RLIMIT_FSIZE on stdout
    assert r["error"] == "exception" and "File too large" in r["detail"]
    assert len(r["output"]) <= sandbox.MAX_OUTPUT


def test_forks_are_bounded_and_cleaned_up():
    # Bounded on purpose: each child sleeps instead of forking, and the loop stops at 200 anyway. A child
    # prints its pid as this machine sees it (/proc is the host's, also inside a PID namespace).
    code = ("import os, sys, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
            "            print('child', os.readlink('/proc/self'), flush=True)\n            time.sleep(30)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(n, type(e).__name__)\n")
    r = run_tests(code, "", [], max_processes=8)
    assert r["passed"], r
    lines = r["output"].splitlines()
    children = [int(line.split()[1]) for line in lines if line.startswith("child")]
    forked, err = next(line for line in lines if not line.startswith("child")).split()
    assert int(forked) < 8 and err == "BlockingIOError"
    if "pidns=True" in r["isolation"]:
        assert len(children) <= int(forked)  # a child killed before it printed is not listed
        time.sleep(0.2)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert alive == []  # the PID namespace took the sleeping children with it, zombies included


def test_fork_bomb_is_contained():
    probe = run_tests("import os\nprint(os.getuid())\n", "", [])
    if os.geteuid() == 0 and probe["output"].strip() == "0":
        pytest.skip("the child kept uid 0, for which the kernel ignores RLIMIT_NPROC: not running a fork bomb")
    t0 = time.monotonic()
    r = run_tests("import os\nwhile True:\n    os.fork()\n", "", [], timeout=5.0, max_processes=8)
    assert (r["passed"], r["error"]) == (False, "exception")
    assert "BlockingIOError" in r["detail"] and time.monotonic() - t0 < 5.0
    after = run_tests(ADD, "", ["assert add(1, 2) == 3"])  # the machine is still usable
    assert after["passed"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        run_tests(ADD, "", [], timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be >= 64"):
        run_tests(ADD, "", [], memory_mb=8)
