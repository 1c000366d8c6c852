"""The README's demo: relay, serving node and proxy on 127.0.0.1, as real processes.

Each part is the real ``peerup`` command in its own process with its own home,
exactly as a user would start them on three machines; only the addresses are
local. A small HTTP server stands in for the service being reached.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from peerup.testing import CliTunnel

PEERUP = [sys.executable, "-m", "peerup"]


@contextlib.contextmanager
def web_service(root: Path) -> Iterator[int]:
    """A real HTTP server on 127.0.0.1: the 'service behind NAT' of the demo."""
    (root / "index.html").write_text("<h1>hello from the machine behind NAT</h1>\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Quiet) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield int(server.server_address[1])
        finally:
            server.shutdown()


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(keep: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="peerup-demo-") as tmp, web_service(Path(tmp)) as web_port:
        homes = {name: Path(tmp) / name for name in ("relay", "home", "laptop")}
        procs = CliTunnel(Path(tmp))
        for home in homes.values():
            subprocess.run([*PEERUP, "--home", str(home), "init"], check=True, capture_output=True)
        laptop_id = subprocess.run(
            [*PEERUP, "--home", str(homes["laptop"]), "whoami"], check=True, capture_output=True, text=True
        ).stdout.strip()
        say("home: peerup auth add <laptop's peer ID>  (only authorized peers reach services)")
        added = subprocess.run(
            [*PEERUP, "--home", str(homes["home"]), "auth", "add", laptop_id, "--comment", "laptop"],
            check=True,
            capture_output=True,
            text=True,
        )
        print(added.stdout.strip())
        try:
            say("relay: peerup relay serve (circuit relay v2 + DHT bootstrap, default port 7777)")
            relay = procs.start("relay", ["--home", str(homes["relay"]), "relay", "serve"])
            relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
            print(f"relay address: {relay_addr}")

            say(f"home: peerup serve --service web=127.0.0.1:{web_port} --relay <relay>")
            server = procs.start(
                "serve",
                [
                    "--home",
                    str(homes["home"]),
                    "-v",
                    "serve",
                    "--service",
                    f"web=127.0.0.1:{web_port}",
                    "--relay",
                    relay_addr,
                ],
            )
            peer_id = server.wait_for(r"^peer (\S+)").group(1)
            server.wait_for(r"reachable at (\S+p2p-circuit\S+)")
            print(f"serving node {peer_id} holds a slot on the relay")

            say("laptop: peerup proxy <peer> web 0 --relay <relay>")
            proxy = procs.start(
                "proxy",
                ["--home", str(homes["laptop"]), "-v", "proxy", peer_id, "web", "0", "--relay", relay_addr],
            )
            port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
            print(f"local port {port} now leads to 'web' on {peer_id[:12]}…")

            say(f"GET http://127.0.0.1:{port}/ through the tunnel")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
                body = response.read().decode()
            print(f"HTTP {response.status}: {body.strip()}")
            path = proxy.wait_for(r"connection from .* (\w+) path", stderr=True).group(1)
            print(f"path taken: {path}")
            if path == "direct":
                print(
                    "(on one machine the serving node's address is reachable, so the relay confirmed it and the"
                    " laptop dialed it directly; behind real NATs the first connection goes through the relay"
                    " and hole punching upgrades it: docs/nat.md)"
                )
            else:
                print(
                    "(the laptop looked the node up before the relay had confirmed the node's direct address,"
                    " so this first connection went through the relay; by the ping below it is confirmed and"
                    " the ping goes direct: docs/nat.md)"
                )

            say("peerup ping <peer> -c 3")
            ping = subprocess.run(
                [
                    *PEERUP,
                    "--home",
                    str(homes["laptop"]),
                    "ping",
                    peer_id,
                    "-c",
                    "3",
                    "--interval",
                    "0.2",
                    "--relay",
                    relay_addr,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            print(ping.stdout.strip() or ping.stderr.strip())
            if keep:
                say("running until Ctrl-C (--keep)")
                with contextlib.suppress(KeyboardInterrupt):
                    while all(p.popen.poll() is None for p in procs.procs):
                        time.sleep(0.5)
            ok = "hello from the machine behind NAT" in body and ping.returncode == 0
            say("demo " + ("succeeded" if ok else "FAILED"))
            return 0 if ok else 1
        except (OSError, AssertionError) as exc:
            say(f"demo FAILED: {exc}")
            print(procs.logs())
            return 1
        finally:
            procs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m peerup.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = parser.parse_args()
    os.environ.pop("PEERUP_HOME", None)
    sys.exit(run(args.keep))


if __name__ == "__main__":
    main()
