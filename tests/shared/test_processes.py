"""Our own processes end, children and ``--parent-pid`` followers included; nothing else does."""

import socket
import subprocess
import sys

from fedbridge_shared.processes import (
    alive,
    descendants,
    free_port,
    owned_by,
    process_table,
    spawn,
    stop,
    tool_env,
    wait_for_port,
)

# a parent with a child, and a follower in its own session naming the parent's PID
TREE = (
    "import os, subprocess, sys, time\n"
    "subprocess.Popen(['sleep', '300'])\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '--parent-pid',"
    " str(os.getpid())], start_new_session=True)\n"
    "time.sleep(300)\n"
)


def test_stop_ends_the_tree_and_the_followers_by_pid(tmp_path):
    bystander = subprocess.Popen(["sleep", "300"])  # ours, but not in the tree
    proc = spawn([sys.executable, "-c", TREE, str(tmp_path)], tmp_path / "log", tool_env())
    try:
        table = {}
        for _ in range(100):  # bounded: the two children appear within seconds
            tree = descendants([proc.pid])
            table = process_table()
            if len(tree) == 3:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert len(tree) == 3, (tree, table.get(proc.pid))
        assert any("--parent-pid" in table[p][1] for p in tree)
        assert owned_by(str(tmp_path)) == tree  # the marker in the parent's command line
        stop([proc], timeout=10)
        assert not any(alive(p) for p in tree)
        assert proc.returncode == -15  # SIGTERM, reaped by Popen itself
        assert alive(bystander.pid)
    finally:
        for p in (bystander, proc):
            p.kill()
            p.wait()


def test_wait_for_port_sees_a_listener_and_a_dead_process():
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        sleeper = subprocess.Popen(["sleep", "300"])
        try:
            assert wait_for_port("127.0.0.1", port, sleeper, timeout=10)
        finally:
            sleeper.kill()
            sleeper.wait()
    assert not wait_for_port("127.0.0.1", port, sleeper, timeout=10)  # exited: False at once
