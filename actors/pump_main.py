"""Child side of a download's byte pump: one process per download attempt, holding the
partial file's descriptor (inherited; its number is the one argument).

Run as ``python -m actors.pump_main FD`` by actors/pump.py. Every byte of every download moves
here, one thread per connection: the GET, the judgement of its response head (actors/heads.py,
the rules the daemon's probe uses too), and the body from the socket to the partial file. Over
plain TCP the body goes socket -> pipe -> file with splice(2), never through this process's
memory; over TLS it is decrypted into a buffer and written (`recv_into`, `pwrite`). Written
bytes are handed to the disk as they come (sync_file_range), so the fsync before publishing
finds little left, verified download or not. The thread also hashes the file's complete front
from the page cache. The daemon decides which ranges to fetch, retries and records progress.

Frames as in actors/frames.py.
Parent -> child:
  pump {id, scheme, host, port, target, netloc, headers: [[k, v]...], start, end, timeout,
        total, etag, ranged, cap, min_free, private_ok, overlap, min_rate, rate_window}
        GET the file from byte `start` up to `end` (null: to its end), never past `cap`;
        connect only where actors/addresses.py allows (`private_ok`); the `overlap` bytes
        before `start` are fetched too and must equal the file's; fail under `min_rate` bytes
        a second over a `rate_window`
  stop {id}                    stop at once
  hash {upto} | hash_reset {}  extend (or restart) the running sha256 of bytes [0, hashed)
  digest {}
Child -> parent:
  {id, pos}                    bytes [start, pos) are written (at most every 50 ms)
  {id, end, pos, reason, errno, status, retry_after, spliced, handed}   the last frame; `end`
        is ok, stopped, transient, disk (errno), full, size, slow, refused (the address rule),
        changed or origin (see actors.heads.Refused);
        `spliced`: the body moved by splice(2); `handed`: bytes handed to the disk
  {hashed, errno?, reason?} | {digest, hashed}
The child exits when its stdin closes (the parent is done or gone).

Standard library plus h11 and certifi: the child starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import signal
import sys
import threading

from actors.frames import Frame, FrameError, FrameWriter, read_frame
from actors.pump_body import BodyFetch, Failed, Stopped

HASH_CHUNK = 8 * 1024 * 1024
# Writing and hashing model files can use a whole core; the daemon's event loop must get the
# CPU at once to answer requests. Raising one's own niceness needs no privilege.
NICENESS = 10


class _Pump:
    """One GET of [start, end) of the file, over a socket of its own, in a thread."""

    def __init__(self, server: Server, msg: Frame) -> None:
        self.server = server
        self.id = int(msg["id"])
        self.msg = msg
        self.stop = threading.Event()
        self.body = BodyFetch(msg, server.fd, self.stop, self._moved)

    def _moved(self, pos: int) -> None:
        self.server.send({"id": self.id, "pos": pos})

    def run(self) -> None:
        end: Frame
        try:
            self.body.run()
            done = self.body.end is None or self.body.pos >= self.body.end
            end = {"end": "ok" if done else "stopped", "spliced": self.body.splices > 0,
                   "handed": self.body.handed_bytes}
        except Stopped:
            end = {"end": "stopped"}
        except Failed as exc:
            end = {"end": "stopped"} if self.stop.is_set() else {
                "end": exc.kind, "reason": exc.reason, "errno": exc.errno,
                "status": exc.status, "retry_after": exc.retry_after}
        except Exception as exc:  # never a silent thread death: the parent waits for `end`
            end = {"end": "transient", "reason": f"{type(exc).__name__}: {exc}"}
        self.server.finished(self, end)


class Server:
    def __init__(self, fd: int, out: FrameWriter) -> None:
        self.fd = fd
        self.out = out
        self.pumps: dict[int, _Pump] = {}
        self.lock = threading.Lock()
        self.hash_jobs: queue.SimpleQueue[Frame] = queue.SimpleQueue()

    def send(self, frame: Frame) -> None:
        self.out.send(frame)

    def finished(self, pump: _Pump, end: Frame) -> None:
        with self.lock:
            self.pumps.pop(pump.id, None)
        self.send({"id": pump.id, "pos": pump.body.pos, "reason": "", "errno": 0, "status": 0,
                   "retry_after": None, **end})

    def serve(self) -> None:
        threading.Thread(target=self._hash_loop, name="hash", daemon=True).start()
        while True:
            msg = read_frame(0)
            if msg is None:
                return
            op = msg.get("op")
            if op == "pump":
                pump = _Pump(self, msg)
                with self.lock:
                    self.pumps[pump.id] = pump
                threading.Thread(target=pump.run, name=f"pump-{pump.id}", daemon=True).start()
            elif op == "stop":
                with self.lock:
                    found = self.pumps.get(int(msg["id"]))
                if found is None:  # never started, or ended: its last frame is sent or now
                    self.send({"id": int(msg["id"]), "end": "stopped"})
                else:
                    found.stop.set()
                    found.body.halt()
            elif op in ("hash", "hash_reset", "digest"):
                self.hash_jobs.put(msg)
            else:
                raise ValueError(f"unknown op {op!r}")

    def _hash_loop(self) -> None:
        hasher, hashed = hashlib.sha256(), 0
        while True:
            msg = self.hash_jobs.get()
            op = msg["op"]
            if op == "hash_reset":
                hasher, hashed = hashlib.sha256(), 0
            elif op == "digest":
                self.send({"digest": hasher.hexdigest(), "hashed": hashed})
            else:
                reply: Frame = {}
                try:
                    hashed = self._hash(hasher, hashed, int(msg["upto"]))
                except OSError as exc:
                    reply = {"errno": exc.errno or 0, "reason": exc.strerror or str(exc)}
                self.send({"hashed": hashed, **reply})

    def _hash(self, hasher: hashlib._Hash, hashed: int, upto: int) -> int:
        """Extend `hasher` from byte `hashed` to `upto` (or the end of the file); returns how
        far it got. The bytes are read where they lie, in the page cache, through a read-only
        map of one chunk at a time: no copy, and no more than a chunk of the file counted in
        this process's resident memory. A file shortened under the map would kill this
        process with SIGBUS, which the parent sees as a failed attempt."""
        upto = min(upto, os.fstat(self.fd).st_size)
        while hashed < upto:
            base = hashed - hashed % mmap.ALLOCATIONGRANULARITY
            n = min(HASH_CHUNK, upto - hashed)
            with mmap.mmap(self.fd, hashed + n - base, access=mmap.ACCESS_READ,
                           offset=base) as mapped, memoryview(mapped) as view:
                hasher.update(view[hashed - base :])
            hashed += n
        return hashed


def main(argv: list[str]) -> int:
    # Ctrl-C at a terminal reaches the whole process group; the daemon stops its children
    # itself (it closes their stdin), after recording where each download stands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m actors.pump_main FD", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)  # this thread; the others inherit it
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    server = Server(int(argv[0]), FrameWriter(os.fdopen(protocol_fd, "wb", buffering=0)))
    try:
        server.serve()
    except (FrameError, ValueError, KeyError, TypeError) as exc:
        print(f"modeld pump: protocol error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # Pumps may still be blocked in recv: the kernel closes their sockets; no teardown.
    os._exit(code)
