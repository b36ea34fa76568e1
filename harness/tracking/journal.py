"""The journal of a run: everything the runner writes into a run reaches MLflow through it.

Each write is appended to `<journal_dir>/<run id>/journal.jsonl` and flushed to disk as it
arrives (a file or folder to log is copied beside it first: the cell's scratch folder goes when
the cell ends); a thread delivers the entries in order and records how far it got (`delivered`).
When the store does not answer (a restarted server, a network blip, a database failover), the
cell trains on and the runner keeps journaling; the thread retries with backoff and catches up
when the store answers again. What is still not delivered when the run ends stays on disk, and
`python -m harness.sync` replays it later.

A replay is idempotent: the entries after `delivered` are compared with what the store has
(metrics by key, step, timestamp and value; params by key; artifacts by path; the adapter model
and dataset inputs by their presence; tags and the end are the same write again), so an entry
delivered just before a failure, or a replay run twice, writes nothing twice. A fully delivered
run's journal is removed.
"""

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil
from mlflow import MlflowClient

from harness.core.errors import disk_full
from harness.core.files import write_whole
from harness.tracking import delivery

ENTRIES, DELIVERED, HEADER, FILES, CLOSED = ("journal.jsonl", "delivered", "run.json", "files",
                                              "closed")
BACKOFF_S = (1, 2, 4, 8, 15, 30)  # between attempts while the store does not answer
FSYNC_EVERY_S = 1.0  # to disk itself, at most this often (a message every step costs none)
# A cell sends a message every step: delivered together, one request a second at most.
DELIVER_EVERY_S = 1.0


class Journal:
    """The writes of one run, journaled, then delivered by a thread of their own (start())."""

    def __init__(self, folder: Path, client: MlflowClient, run_id: str, experiment_id: str):
        self.folder, self.client, self.run_id = folder, client, run_id
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / HEADER).exists():
            write_whole(folder / HEADER, lambda path: path.write_text(json.dumps(
                {"run_id": run_id, "experiment_id": experiment_id,
                 "tracking_uri": client.tracking_uri, "created": time.time(),
                 "host": socket.gethostname(), "pid": os.getpid(),
                 "started": psutil.Process().create_time()})))
        self.entries = _read(folder)
        self.delivered = _delivered(folder)
        self.file = open(folder / ENTRIES, "a")
        self.unsaved = None  # the first entry not on disk (a full disk), else None
        self.synced = 0.0
        self.lock = threading.Condition()
        self.unreachable_since = None  # when the store stopped answering, while it does not
        self.rejected = []  # (entry, error) the store refused
        self.thread = None
        self.closing = False

    # What the runner writes: the MlflowClient calls it used to make, for this run.
    def metrics(self, metrics: dict, step: int, timestamp_ms: int) -> None:
        self._append("metrics", metrics=[[key, float(value), timestamp_ms, step]
                                         for key, value in metrics.items()])

    def series(self, points: list) -> None:
        """Many points at once: [key, value, timestamp_ms, step] each."""
        self._append("metrics", metrics=[[key, float(value), timestamp, step]
                                         for key, value, timestamp, step in points])

    def params(self, params: dict) -> None:
        self._append("params", params={key: str(value) for key, value in params.items()})

    def tags(self, tags: dict) -> None:
        self._append("tags", tags={key: str(value) for key, value in tags.items()})

    def set_tag(self, key: str, value) -> None:
        self.tags({key: value})

    def artifact(self, path: Path | str, folder: str | None = None) -> None:
        """A file or folder, copied into the journal now (`folder`: where in the run's
        artifacts); where the disk is full, a tag says it is not recorded."""
        try:
            kept = self._keep(Path(path))
        except OSError as error:
            if disk_full(error) is None:
                raise
            self.set_tag(f"not_recorded_{Path(path).name}", disk_full(error))
            return
        self._append("artifact", path=kept, folder=folder)

    def text(self, text: str, name: str) -> None:
        self._append("text", text=text, name=name)

    def inputs(self, datasets: list[dict]) -> None:
        """Dataset inputs: dicts of name, digest, source_type, source, profile, context."""
        self._append("inputs", datasets=datasets)

    def adapter_model(self, experiment_id: str, adapter: Path, model_config: dict) -> None:
        self._append("adapter_model", experiment_id=experiment_id, path=self._keep(adapter),
                     model_config=model_config)

    def end(self, status: str, end_time_ms: int | None = None) -> None:
        self._append("end", status=status, end_time=end_time_ms or int(time.time() * 1000))

    def _append(self, op: str, **body) -> None:
        with self.lock:
            entry = {"seq": len(self.entries) + 1, "op": op, **body}
            self._save(entry)
            self.entries.append(entry)
            # Delivery waits for a first entry, or for its next turn (DELIVER_EVERY_S), which a
            # further entry does not move: waking it for each (a metric each step) would take
            # a core from the cell for nothing.
            if self.pending() == 1:
                self.lock.notify_all()

    def _save(self, entry: dict) -> None:
        """The entry on disk; where the disk is full, in memory alone from then on (delivered
        from there; written out again at close if the disk has room by then)."""
        if self.unsaved is not None:
            return
        try:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()  # a runner killed now loses none of it
            if time.monotonic() - self.synced >= FSYNC_EVERY_S:  # nor, soon, a machine that stops
                os.fsync(self.file.fileno())
                self.synced = time.monotonic()
        except OSError as error:
            if disk_full(error) is None:
                raise
            self.unsaved = entry["seq"]
            print(f"[harness] run {self.run_id}: the journal cannot be written ({disk_full(error)}"
                  f"); entries from {entry['seq']} on are kept in memory and delivered from there")

    def _keep(self, path: Path) -> str:
        """Copy `path` into the journal's files; its path there, relative to the journal."""
        kept = Path(FILES) / str(len(self.entries) + 1) / path.name
        if path.is_dir():
            shutil.copytree(path, self.folder / kept)
        else:
            (self.folder / kept).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, self.folder / kept)
        return str(kept)

    # Delivery.
    def start(self) -> "Journal":
        self.thread = threading.Thread(target=self._deliver_until_closed, daemon=True,
                                       name=f"journal-{self.run_id[:8]}")
        self.thread.start()
        return self

    def pending(self) -> int:
        return len(self.entries) - self.delivered

    def close(self, wait_s: float) -> int:
        """Stop delivering once everything is delivered or `wait_s` has passed; the entries not
        delivered (0: the journal is removed)."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        deadline = time.monotonic() + wait_s
        while self.thread is not None and self.thread.is_alive() and self.pending():
            self.thread.join(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
        with self.lock:
            self.closing = None  # the thread stops at its next look
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=60)
        left = self.pending()
        try:
            if left and self.unsaved is not None:  # the disk may have room again
                self._rewrite()
            self.file.close()
            if left:
                (self.folder / CLOSED).touch()  # for `harness.sync`: nobody delivers it now
        except OSError as error:
            if disk_full(error) is None:
                raise
            print(f"[harness] run {self.run_id}: {left} journal entries could neither reach the "
                  f"store nor be saved ({disk_full(error)}): they are lost")
        if not left:
            shutil.rmtree(self.folder, ignore_errors=True)
        return left

    def _rewrite(self) -> None:
        """Every entry into the journal's file again (it lacks those after `unsaved`)."""
        self.file.close()
        write_whole(self.folder / ENTRIES, lambda path: path.write_text(
            "".join(json.dumps(entry) + "\n" for entry in self.entries)))
        self.file = open(self.folder / ENTRIES, "a")
        self.unsaved = None
        print(f"[harness] run {self.run_id}: the journal is saved whole again")

    def _deliver_until_closed(self) -> None:
        attempt, checked = 0, False  # checked: compare with the store (after a failure)
        delivered_at = 0.0
        while True:
            with self.lock:
                while self.closing is False:  # running: at most one delivery a DELIVER_EVERY_S
                    if not self.pending():
                        self.lock.wait()
                        continue
                    wait_s = DELIVER_EVERY_S - (time.monotonic() - delivered_at)
                    if wait_s <= 0:
                        break
                    self.lock.wait(wait_s)
                if self.closing is None or not self.pending():
                    return  # told to stop, or closing with everything delivered
                batch = delivery.next_batch(self.entries, self.delivered)
            delivered_at = time.monotonic()
            try:
                delivery.deliver(self.client, self.run_id, self.folder, batch, checked)
            except Exception as error:  # noqa: BLE001 - what the store said decides
                if delivery.rejected(error):
                    self.rejected.append((batch[0]["seq"], f"{type(error).__name__}: {error}"))
                    print(f"[harness] run {self.run_id}: the store refused journal entry "
                          f"{batch[0]['seq']} ({batch[0]['op']}): {error}")
                    batch = batch[:1]  # that entry alone is passed over
                else:
                    if self.unreachable_since is None:
                        self.unreachable_since = time.time()
                        print(f"[harness] run {self.run_id}: the tracking store does not answer "
                              f"({type(error).__name__}); the cell goes on, its results are "
                              f"journaled in {self.folder}")
                    checked = True
                    retry_at = time.monotonic() + BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                    with self.lock:  # back off (new entries do not cut it short), unless stopped
                        while self.closing is not None and time.monotonic() < retry_at:
                            self.lock.wait(retry_at - time.monotonic())
                    attempt += 1
                    continue
            if self.unreachable_since is not None:
                print(f"[harness] run {self.run_id}: the tracking store answers again after "
                      f"{time.time() - self.unreachable_since:.0f} s; delivering the journal")
                self.unreachable_since = None
            attempt, checked = 0, False
            with self.lock:
                self.delivered = batch[-1]["seq"]
            try:
                _save_delivered(self.folder, self.delivered)
            except OSError as error:  # a full disk: a replay compares with the store anyway
                if disk_full(error) is None:
                    raise


def _read(folder: Path) -> list:
    """The entries journaled so far (a line cut short by a crash is the last and is dropped)."""
    path = folder / ENTRIES
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return entries


def _delivered(folder: Path) -> int:
    path = folder / DELIVERED
    return int(path.read_text()) if path.exists() else 0


def _save_delivered(folder: Path, seq: int) -> None:
    write_whole(folder / DELIVERED, lambda path: path.write_text(str(seq)))


# Later: what `python -m harness.sync` replays.
def pending(journal_dir: Path) -> list[Path]:
    """The journals under `journal_dir` with entries not delivered, oldest first; not those of a
    runner still running (it delivers its own)."""
    if not journal_dir.is_dir():
        return []
    found = [folder for folder in journal_dir.iterdir() if (folder / HEADER).exists()
             and pending_entries(folder) and not _writer_alive(folder)]
    return sorted(found, key=lambda folder: (folder / HEADER).stat().st_mtime)


def pending_entries(folder: Path) -> int:
    return len(_read(folder)) - _delivered(folder)


def header(folder: Path) -> dict:
    return json.loads((folder / HEADER).read_text())


def replay(folder: Path, client: MlflowClient | None = None) -> int:
    """Deliver a journal's pending entries, comparing each with the store; how many there were.
    Removes the journal once all are delivered. Raises what the store raised where it does not
    answer (the rest stays pending)."""
    found = header(folder)
    client = client or MlflowClient(found["tracking_uri"])
    entries, delivered = _read(folder), _delivered(folder)
    count = len(entries) - delivered
    while delivered < len(entries):
        batch = delivery.next_batch(entries, delivered)
        try:
            delivery.deliver(client, found["run_id"], folder, batch, checked=True)
        except Exception as error:  # noqa: BLE001
            if not delivery.rejected(error):
                raise
            print(f"[harness] run {found['run_id']}: the store refused journal entry "
                  f"{batch[0]['seq']} ({batch[0]['op']}): {error}")
            batch = batch[:1]
        delivered = batch[-1]["seq"]
        _save_delivered(folder, delivered)
    shutil.rmtree(folder, ignore_errors=True)
    return count


def _writer_alive(folder: Path) -> bool:
    """Whether the runner that writes this journal is running on this host and delivering it."""
    found = header(folder)
    if (folder / CLOSED).exists():
        return False
    if found.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(found["pid"]).create_time() - found["started"]) < 1.0
    except psutil.NoSuchProcess:
        return False
