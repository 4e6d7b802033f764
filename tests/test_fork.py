"""Fork safety: a process that computed with several OpenMP threads, then
forked, must have a child that computes correctly and does not hang.

GNU libgomp hangs there without help (the child's first parallel region
waits for pool threads that fork() did not copy); csrc/fork_safety.c makes
the forking thread's kernels serial in the child. Every scenario runs in a
fresh interpreter under a hard timeout, and the scenario itself kills a
child that does not finish, so a regression fails instead of hanging CI.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import fastattn

pytestmark = [pytest.mark.no_sanitizer,
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 120  # whole scenario; each child gets 30 s

PRELUDE = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    import fastattn
    import strategies as S

    BIG = np.random.default_rng(0).standard_normal((64, 64, 64)).astype(np.float32)

    def compute_all():
        # every kernel small, plus one call big enough for several threads
        out = {name: call() for name, call in S.SMALL_CALLS.items()}
        out["big"] = fastattn.masked_softmax(BIG, key_lengths=np.arange(64) % 65,
                                             num_threads=2)
        out["big_split"] = fastattn.split_heads(BIG, 4, num_threads=2)
        return out

    def same(a, b):
        return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    def wait_child(pid, seconds=30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("CHILD HUNG", flush=True)
        sys.exit(3)

    fastattn.set_num_threads(2)
    PARENT = compute_all()          # the parent has used a 2-thread OpenMP team
    assert not fastattn._kernels.fork_child_serial()
""")


def run_scenario(body):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    # its own session, so that a hung child or grandchild is killed with it
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"fork scenario hung for {TIMEOUT} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a failed scenario
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"rc={proc.returncode}\n{stdout}\n{stderr}"
    return stdout


def test_os_fork_child_computes():
    out = run_scenario("""
        pid = os.fork()
        if pid == 0:
            ok = same(compute_all(), PARENT)
            ok &= fastattn._kernels.fork_child_serial() and fastattn.get_num_threads() == 1
            os._exit(0 if ok else 1)
        rc = wait_child(pid)
        assert rc == 0, f"child failed: {rc}"
        assert same(compute_all(), PARENT)      # the parent still has its threads
        print("OK")
    """)
    assert "OK" in out


def test_multiprocessing_fork_pool():
    out = run_scenario("""
        import multiprocessing as mp

        def work(i):
            r = compute_all()
            return i, all(np.array_equal(r[k], PARENT[k]) for k in PARENT)

        ctx = mp.get_context("fork")
        with ctx.Pool(2) as pool:
            res = pool.map_async(work, range(4)).get(timeout=60)
        assert res == [(i, True) for i in range(4)], res
        print("OK")
    """)
    assert "OK" in out


def test_child_threads_keep_parallelism_and_grandchild():
    out = run_scenario("""
        pid = os.fork()
        if pid == 0:
            res = {}
            def in_thread():
                # a thread the child starts has a fresh OpenMP pool
                res["serial"] = fastattn._kernels.fork_child_serial()
                res["same"] = same(compute_all(), PARENT)
            t = threading.Thread(target=in_thread)
            t.start()
            t.join(30)
            ok = not t.is_alive() and res == {"serial": False, "same": True}
            gpid = os.fork()                  # and a grandchild
            if gpid == 0:
                os._exit(0 if same(compute_all(), PARENT) else 1)
            ok &= wait_child(gpid) == 0
            os._exit(0 if ok else 1)
        assert wait_child(pid) == 0
        print("OK")
    """)
    assert "OK" in out


def test_fork_from_a_worker_thread():
    # the parent computed from the main thread; a worker thread forks
    out = run_scenario("""
        rc = []
        def forker():
            pid = os.fork()
            if pid == 0:
                os._exit(0 if same(compute_all(), PARENT) else 1)
            rc.append(wait_child(pid))
        t = threading.Thread(target=forker)
        t.start()
        t.join(60)
        assert rc == [0], rc
        print("OK")
    """)
    assert "OK" in out
