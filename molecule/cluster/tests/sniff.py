"""Print the vLLM requests a host receives: one JSON line per request on ``PORT`` that carries
an X-Vllm-Priority header (its sender's address, the header's value, its X-Request-ID).

Run in a test host's network namespace from the controller (``nsenter -t PID -n python3
sniff.py PORT``): a raw packet socket (root) sees what reaches the host's interfaces, with
nothing installed on the host. Prints ``ready`` once it listens; runs until killed.
"""

from __future__ import annotations

import json
import socket
import struct
import sys

PORT = int(sys.argv[1])
ETH_P_ALL = 0x0003


def header(payload: bytes, name: bytes) -> str | None:
    start = payload.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return payload[start : payload.find(b"\r\n", start)].strip().decode()


def main() -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    print("ready", flush=True)
    seen: set[bytes] = set()
    while True:
        frame, (_, _, pkttype, *_) = s.recvfrom(65535)
        if pkttype == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":  # IPv4 in
            continue
        ip = frame[14:]
        if ip[9] != 6:  # TCP
            continue
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        if struct.unpack("!H", tcp[2:4])[0] != PORT:
            continue
        payload = tcp[(tcp[12] >> 4) * 4 :]
        priority = header(payload, b"X-Vllm-Priority")
        if priority is None or payload in seen:
            continue
        seen.add(payload)
        record = {
            "src": socket.inet_ntoa(ip[12:16]),
            "priority": priority,
            "request_id": header(payload, b"X-Request-ID"),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
