"""Linux network namespaces for the chaos tests: a coordinator namespace that routes for three
hospital namespaces over veth pairs, nftables rules so a hospital reaches only the coordinator's
SuperLink port, processes started inside a namespace, network cuts, and packet capture.

Layout (addresses are private to the namespaces made here, so they collide with nothing):
  coordinator  lo 10.231.0.1/32 (the SuperLink's address, name COORDINATOR_HOST)
               h<i> 10.231.<i>.1/30  --veth--  hospital i: uplink 10.231.<i>.2/30, default via .1
The coordinator namespace forwards (a router would), so without the firewall hospital A could
reach hospital B: the nftables rules are what stops it, and the tests check both sides of that.
Every name carries a per-run prefix (fsct-<pid>-); stale fsct-* namespaces are removed first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IP = "/usr/sbin/ip"
PREFIX = "fsct-"
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec` bind-mounts <here>/<ns>/hosts on /etc/hosts
COORDINATOR_ADDR = "10.231.0.1"
COORDINATOR_HOST = "fedsight-coordinator"  # the name in the SuperLink certificate


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check,
                          timeout=timeout)


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None when they can): not root, no `ip`/`nft`, or the
    kernel refuses (EPERM in an unprivileged container)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in (IP, "nft"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = run(IP, "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    run(IP, "netns", "del", probe, check=False)
    return None


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is ns (what `ip netns pids` does, without a process
    per call: the chaos test polls this to catch a message process mid-round)."""
    try:
        ino = (NETNS_RUN / ns).stat().st_ino
    except OSError:
        return []
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if os.stat(d / "ns" / "net").st_ino == ino:
                out.append(int(d.name))
        except OSError:
            continue  # exited meanwhile, or a kernel thread
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> set[int]:
    """pid and every process below it (by parent pid)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo += kids
    return out


def kill_pids(pids: list[int] | set[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_all_in(ns: str, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
    """Kill every process in namespace ns and wait until none is left (a host losing power)."""
    end = time.monotonic() + wait
    while (pids := pids_in(ns)) and time.monotonic() < end:
        kill_pids(pids, sig)
        time.sleep(0.1)


def _stale(name: str) -> bool:
    """An fsct-<pid>-... name whose test process is gone (or is us: an earlier test of this
    session that could not clean up). A live run's namespaces are left alone."""
    owner = name.removeprefix(PREFIX).split("-", 1)[0]
    if not owner.isdigit():
        return True  # fsct-probe-..., or not ours to keep
    return int(owner) == os.getpid() or not Path(f"/proc/{owner}").exists()


def remove_stale() -> list[str]:
    """Delete fsct-* namespaces (and their /etc/netns folders) a crashed earlier run left."""
    listed = run(IP, "netns", "list", check=False).stdout.split("\n")
    stale = [line.split()[0] for line in listed if line.startswith(PREFIX)]
    stale = [ns for ns in stale if _stale(ns)]
    for ns in stale:
        kill_all_in(ns)
        run(IP, "netns", "del", ns, check=False)
    for d in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.is_dir() else []:
        if _stale(d.name) and not (NETNS_RUN / d.name).exists():
            shutil.rmtree(d, ignore_errors=True)
    return stale


@dataclass
class Hospital:
    name: str  # site id, e.g. site_a
    ns: str
    addr: str  # its uplink address
    gateway: str  # the coordinator's end of its veth


@dataclass
class Topology:
    prefix: str
    coordinator: str  # namespace name
    hospitals: dict[str, Hospital] = field(default_factory=dict)
    superlink_port: int = 0

    def exec(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside namespace ns."""
        return [IP, "netns", "exec", ns]

    def namespaces(self) -> list[str]:
        return [self.coordinator, *(h.ns for h in self.hospitals.values())]


def _sh(ns: str, *cmd: str) -> None:
    run(IP, "netns", "exec", ns, *cmd)


def build(sites: list[str], tag: str = "") -> Topology:
    """Namespaces, veths, addresses and routes; no firewall yet (firewall() adds it)."""
    prefix = f"{PREFIX}{os.getpid()}{tag}-"
    topo = Topology(prefix, f"{prefix}coord")
    try:
        run(IP, "netns", "add", topo.coordinator)
        _sh(topo.coordinator, IP, "link", "set", "lo", "up")
        _sh(topo.coordinator, IP, "addr", "add", f"{COORDINATOR_ADDR}/32", "dev", "lo")
        _sh(topo.coordinator, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, site in enumerate(sites, start=1):
            h = Hospital(site, f"{prefix}h{i}", f"10.231.{i}.2", f"10.231.{i}.1")
            topo.hospitals[site] = h
            run(IP, "netns", "add", h.ns)
            # Both veth ends are created inside their namespaces: no name in the host's.
            run(IP, "link", "add", f"h{i}", "netns", topo.coordinator, "type", "veth",
                "peer", "name", "uplink", "netns", h.ns)
            _sh(topo.coordinator, IP, "addr", "add", f"{h.gateway}/30", "dev", f"h{i}")
            _sh(topo.coordinator, IP, "link", "set", f"h{i}", "up")
            for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{h.addr}/30", "dev",
                        "uplink"], ["link", "set", "uplink", "up"],
                        ["route", "add", "default", "via", h.gateway]):
                _sh(h.ns, IP, *cmd)
            etc = NETNS_ETC / h.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{COORDINATOR_ADDR} "
                                       f"{COORDINATOR_HOST}\n")
    except BaseException:
        destroy(topo)
        raise
    return topo


def firewall(topo: Topology, port: int) -> None:
    """Hospitals may open TCP connections to COORDINATOR_ADDR:port only: egress filter in each
    hospital, and on the coordinator no forwarding between hospitals and no other local port."""
    topo.superlink_port = port
    for h in topo.hospitals.values():
        _nft(h.ns, f"""
table inet fsct {{
  chain egress {{ type filter hook output priority 0; policy drop;
    oifname "lo" accept
    ct state established,related accept
    ip daddr {COORDINATOR_ADDR} tcp dport {port} accept
  }}
  chain ingress {{ type filter hook input priority 0; policy drop;
    iifname "lo" accept
    ct state established,related accept
  }}
}}""")
    _nft(topo.coordinator, f"""
table inet fsct {{
  chain ingress {{ type filter hook input priority 0; policy accept;
    iifname "h*" ct state established,related accept
    iifname "h*" ip daddr {COORDINATOR_ADDR} tcp dport {port} accept
    iifname "h*" drop
  }}
  chain routed {{ type filter hook forward priority 0; policy drop; }}
}}""")


def _nft(ns: str, ruleset: str) -> None:
    done = subprocess.run([IP, "netns", "exec", ns, "nft", "-f", "-"], input=ruleset,
                          text=True, capture_output=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {done.stderr.strip()}")


def cut(h: Hospital) -> None:
    """Network cut: every packet in and out of the hospital is dropped (a cable pulled; TCP
    connections stall rather than fail fast, as in a real outage)."""
    _nft(h.ns, """
table inet fsctcut {
  chain ingress { type filter hook input priority -10; policy accept; iifname "uplink" drop; }
  chain egress { type filter hook output priority -10; policy accept; oifname "uplink" drop; }
}""")


def restore(h: Hospital) -> None:
    run(IP, "netns", "exec", h.ns, "nft", "delete", "table", "inet", "fsctcut", check=False)


def can_connect(topo: Topology, ns: str, addr: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from inside ns to addr:port is established."""
    code = (f"import socket;s=socket.socket();s.settimeout({timeout})\n"
            f"try:\n s.connect(({addr!r},{port}));print('ok')\nexcept OSError as e:print(e)")
    out = subprocess.run([*topo.exec(ns), sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=timeout + 20, check=False)
    return out.stdout.strip() == "ok"


def wait_port(topo: Topology, ns: str, addr: str, port: int, timeout: float) -> bool:
    """Whether addr:port accepts a TCP connection inside ns within timeout (one process)."""
    code = (f"import socket,time\nend=time.monotonic()+{timeout}\nwhile time.monotonic()<end:\n"
            f" s=socket.socket();s.settimeout(1)\n"
            f" try:\n  s.connect(({addr!r},{port}));print('ok');break\n"
            f" except OSError:time.sleep(0.3)\n finally:s.close()")
    out = subprocess.run([*topo.exec(ns), sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=timeout + 20, check=False)
    return out.stdout.strip() == "ok"


@contextlib.contextmanager
def listener(topo: Topology, ns: str, addr: str, port: int) -> Iterator[None]:
    """A TCP server accepting connections inside ns (a target the firewall must block)."""
    code = (f"import socket,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
            f"socket.SO_REUSEADDR,1);s.bind(({addr!r},{port}));s.listen(16);print('up',"
            f"flush=True)\nwhile True:c,_=s.accept();c.close()")
    proc = subprocess.Popen([*topo.exec(ns), sys.executable, "-c", code], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        yield
    finally:
        proc.kill()
        proc.wait()


def destroy(topo: Topology) -> None:
    """Kill every process in the namespaces, delete them (their veths go with them)."""
    for ns in topo.namespaces():
        kill_all_in(ns)
        run(IP, "netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


# ---- packet capture --------------------------------------------------------------------------

@contextlib.contextmanager
def capture(topo: Topology, h: Hospital, out: Path) -> Iterator[Path]:
    """tcpdump of every packet on the hospital's only link (full packets) into out."""
    proc = subprocess.Popen([*topo.exec(h.ns), "tcpdump", "-i", "uplink", "-n", "-s", "0",
                             "-U", "-w", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on uplink, ..." once it captures
        assert "listening on" in line, line
        yield out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # tcpdump flushes the file on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tcp_streams(pcap: Path, src: str) -> dict[tuple[str, int, str, int], bytes]:
    """Reassembled TCP payload per connection direction, for packets sent from src (a pcap of
    Ethernet frames as tcpdump writes it). Retransmitted segments count once (by sequence)."""
    data = pcap.read_bytes()
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"expected Ethernet captures, got link type {linktype}"
    segs: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "IIII", data[pos:pos + 16])[2]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue  # not IPv4
        ip = frame[14:]
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        total = struct.unpack("!H", ip[2:4])[0]
        s_addr, d_addr = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        if proto != 6 or s_addr != src:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            segs.setdefault((s_addr, sport, d_addr, dport), {})[seq] = payload
    streams = {}
    for key, by_seq in segs.items():
        first = min(by_seq)  # sequence numbers wrap only after 4 GiB: not in a test run
        buf = bytearray()
        for seq in sorted(by_seq):
            off = seq - first
            chunk = by_seq[seq]
            if off > len(buf):  # a segment the capture missed: keep later offsets right
                buf += bytes(off - len(buf))
            buf[off:off + len(chunk)] = chunk
        streams[key] = bytes(buf)
    return streams
