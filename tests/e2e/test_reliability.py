"""Crash durability and hot reload under load, against a real ``bentoml serve noisewise.services.service:Noisewise``.

- SIGKILL durability: feedback streams in from several clients; the server and its worker (which holds the
  store) are SIGKILLed mid-stream. After a restart on the same store, every item acknowledged with a 2xx is
  stored exactly once; items that got no answer may or may not be stored, never twice; re-sending every
  item (the clients' retry) ends with every item stored exactly once, the stored ones reported duplicates.
- Hot reload under load: continuous ``/predict`` traffic while the ``champion`` alias moves to a recalibrated
  version (picked up by the service's polling), then back (``POST /reload``): zero failed requests, and every
  response names the version whose calibration computed it.

Both use a dedicated registered model (``reliability-test``) so that moving its alias disturbs no other test,
and their own SQLite store. Every process started here is stopped by PID. The figures are printed (``-s``)
and copied into docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.e2e.test_server import ROOT, START_TIMEOUT_S, free_port, server_env, stop
from tests.integration.serving_model import digits, ensure_model

pytestmark = pytest.mark.slow

NAME = "reliability-test"
REF = f"{NAME}@champion"


def ensure_reliability_model() -> str:
    """The dedicated model (a copy of the serving-test recipe): this module moves its alias."""
    return ensure_model(NAME)


class Server:
    """One ``bentoml serve`` process tree on a free loopback port."""

    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "noisewise.services.service:Noisewise", "--host", "127.0.0.1",
                 "--port", str(self.port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def sigkill(self, store: Path) -> tuple[list[int], list[int]]:
        """SIGKILL the server and every process under it, the server first so that it cannot start a new
        worker in between; returns the PIDs killed and those of them that had ``store`` open."""
        parent = psutil.Process(self.proc.pid)
        tree = [parent, *parent.children(recursive=True)]
        holders = []
        for process in tree:
            with contextlib.suppress(psutil.Error):
                if any(Path(f.path) == store for f in process.open_files()):
                    holders.append(process.pid)
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"still alive after SIGKILL: {alive}"
        return [p.pid for p in tree], holders

    def stop(self) -> None:
        stop(self.proc)


@contextlib.contextmanager
def running(env: dict, log: Path):
    server = Server(env, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model():
    return ensure_reliability_model()


def env_for(model: str, store: Path, **extra: str) -> dict:
    return server_env(NOISEWISE_MODEL=model, NOISEWISE_STORE_URL=f"sqlite:///{store}",
                      NOISEWISE_MONITOR_INTERVAL_S="0", **extra)


# ------------------------------------------------------------------------------------------- SIGKILL durability

KILL_AT = 0.4  # share of all items acknowledged when the server is killed


def label_for(index: int, client: int) -> int:
    """A fixed label per item, so that a re-sent item is a duplicate, never a conflict."""
    return (index * 7 + client * 3) % 10


# (clients, predictions each client labels, items per request): batches from a few clients, then many clients
# sending one item at a time, whose requests share group commits
SIGKILL_STREAMS = [(4, 200, 5), (32, 40, 1)]


@pytest.mark.parametrize("clients, predictions, per_request", SIGKILL_STREAMS,
                         ids=["4-clients-batches", "32-clients-single-items"])
def test_sigkill_mid_feedback_loses_no_acknowledged_item(model, tmp_path, clients, predictions, per_request):
    store = tmp_path / "store.db"
    env = env_for(model, store, NOISEWISE_RELOAD_INTERVAL_S="0")
    log = tmp_path / "bentoml-serve.log"
    server = Server(env, log)
    try:
        server.wait_ready()
        x, _ = digits(predictions, start=100)
        ids: list[str] = []
        for start in range(0, predictions, 50):
            response = httpx.post(f"{server.url}/predict", json={"inputs": x[start:start + 50].reshape(-1, 64).tolist()},
                                  timeout=60)
            assert response.status_code == 200, response.text
            ids += [p["id"] for p in response.json()["predictions"]]

        # every client labels every prediction under its own annotator name: all items are distinct
        items = {(ids[i], f"client-{c}"): label_for(i, c) for c in range(clients) for i in range(predictions)}
        acknowledged: set[tuple[str, str]] = set()
        unanswered: set[tuple[str, str]] = set()
        rejected: list[dict] = []
        lock = threading.Lock()

        def stream(client: int) -> None:
            mine = [(ids[i], f"client-{client}", label_for(i, client)) for i in range(predictions)]
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for start in range(0, len(mine), per_request):
                    batch = mine[start:start + per_request]
                    body = {"items": [{"prediction_id": p, "annotator": a, "label": y} for p, a, y in batch]}
                    try:
                        response = http.post("/feedback", json=body)
                    except httpx.TransportError:  # the server died with this request in flight
                        with lock:
                            unanswered.update((p, a) for p, a, _ in batch)
                        return
                    with lock:
                        if response.status_code in (200, 207):
                            for (p, a, _), result in zip(batch, response.json()["items"]):
                                if result["status"] in (200, 201):
                                    acknowledged.add((p, a))
                                else:
                                    rejected.append(result)
                        else:
                            rejected.append({"status": response.status_code, "body": response.text[:200]})

        threads = [threading.Thread(target=stream, args=(c,), daemon=True) for c in range(clients)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(acknowledged) < KILL_AT * len(items):
            assert time.monotonic() < deadline and any(t.is_alive() for t in threads), \
                f"feedback stream stalled at {len(acknowledged)} acknowledged items: {rejected[:3]}"
            time.sleep(0.002)
        killed, holders = server.sigkill(store)
        for thread in threads:
            thread.join(timeout=60)
        acked_at_kill = set(acknowledged)
    finally:
        server.stop()

    assert not rejected, rejected[:5]
    assert holders and server.proc.pid not in holders, "the killed tree did not include the worker holding the store"
    assert 0 < len(acked_at_kill) < len(items), "the kill did not land mid-stream"
    assert not acked_at_kill & unanswered
    unsent = set(items) - acked_at_kill - unanswered

    from noisewise.monitoring.store import Store

    with running(env, tmp_path / "bentoml-serve-2.log") as restarted:
        db = Store(f"sqlite:///{store}")
        try:
            frame = db.feedback_frame()
            counts = Counter(zip(frame["prediction_id"], frame["annotator"]))
            stored_labels = dict(zip(zip(frame["prediction_id"], frame["annotator"]), frame["label"]))
            assert max(counts.values(), default=1) == 1, [k for k, n in counts.items() if n > 1][:5]
            recovered = acked_at_kill & set(counts)
            assert recovered == acked_at_kill, f"lost {len(acked_at_kill - recovered)} acknowledged items"
            assert set(counts) <= set(items), "an item nobody sent is in the store"
            assert all(stored_labels[k] == items[k] for k in counts)
            unanswered_stored = unanswered & set(counts)
            assert not unsent & set(counts), "an item never sent is in the store"

            # the clients' retry: everything again, in bigger batches
            everything = list(items)
            statuses: Counter = Counter()
            per_item: dict[tuple[str, str], int] = {}
            with httpx.Client(base_url=restarted.url, timeout=60) as http:
                for start in range(0, len(everything), 100):
                    batch = everything[start:start + 100]
                    body = {"items": [{"prediction_id": p, "annotator": a, "label": items[p, a]} for p, a in batch]}
                    response = http.post("/feedback", json=body)
                    assert response.status_code == 200, response.text[:500]
                    for key, result in zip(batch, response.json()["items"]):
                        per_item[key] = result["status"]
                        statuses[result["status"]] += 1
            assert all(per_item[k] == 200 for k in counts), "a stored item was not reported as a duplicate"
            assert all(per_item[k] == 201 for k in set(items) - set(counts))
            final = db.feedback_frame()
            final_counts = Counter(zip(final["prediction_id"], final["annotator"]))
            assert set(final_counts) == set(items) and set(final_counts.values()) == {1}
        finally:
            db.close()

    figures = {"items": len(items), "clients": clients, "items_per_request": per_request,
               "processes_killed": len(killed), "acknowledged": len(acked_at_kill), "recovered": len(recovered),
               "unanswered": len(unanswered), "unanswered_stored": len(unanswered_stored), "unsent": len(unsent),
               "retry_duplicates": statuses[200], "retry_stored": statuses[201], "final_rows": len(final)}
    print("\nRELIABILITY sigkill " + json.dumps(figures))


# ------------------------------------------------------------------------------------------- hot reload under load

THREADS = 4


def coverage_of(response: dict) -> float:
    return float(response["guarantees"]["prediction_set"]["target_coverage"])


def test_hot_reload_under_load_fails_no_request(model, tmp_path):
    from noisewise.models.registry import resolve_version, set_alias
    from noisewise.services.cli import main

    _, v1, _ = resolve_version(model)
    env = env_for(model, tmp_path / "store.db", NOISEWISE_RELOAD_INTERVAL_S="1")
    x, _ = digits(64, start=300)
    rows = x.reshape(len(x), -1)
    with running(env, tmp_path / "bentoml-serve.log") as server:
        records: list[tuple[int, float, int, tuple, float | None]] = []  # thread, done at, status, versions, coverage
        failures: list[str] = []
        stop_traffic = threading.Event()
        lock = threading.Lock()

        def traffic(k: int) -> None:
            rng = np.random.default_rng(k)
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop_traffic.is_set():
                    n = int(rng.integers(1, 9))
                    start = int(rng.integers(0, len(rows) - n))
                    try:
                        response = http.post("/predict", json={"inputs": rows[start:start + n].tolist()})
                    except httpx.HTTPError as err:
                        with lock:
                            failures.append(f"{type(err).__name__}: {err}")
                        continue
                    done = time.monotonic()
                    if response.status_code != 200:
                        with lock:
                            failures.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                    body = response.json()
                    versions = tuple(sorted({p["model"]["version"] for p in body["predictions"]}))
                    with lock:
                        records.append((k, done, 200, versions, coverage_of(body)))

        def served_after(t: float) -> set:
            with lock:
                return {r[3] for r in records if r[1] > t}

        threads = [threading.Thread(target=traffic, args=(k,), daemon=True) for k in range(THREADS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):  # a new calibrated version of the same weights, not promoted
                assert main(["calibrate", "--model", model, "--alpha", "0.2", "--risk", "0.25", "--json"]) == 0
            v2 = str(json.loads(out.getvalue())["model_version"])
            assert v2 != v1
            switch_1 = time.monotonic()
            set_alias(NAME, v2, "champion")
            deadline = switch_1 + 60
            while (v2,) not in served_after(switch_1):  # the service polls the alias every second
                assert time.monotonic() < deadline, "the service did not follow the alias within 60 s"
                time.sleep(0.05)
            picked_up_s = time.monotonic() - switch_1
            time.sleep(2)
            switch_2 = time.monotonic()
            set_alias(NAME, v1, "champion")
            reload = httpx.post(f"{server.url}/reload", timeout=60)
            assert reload.status_code == 200, reload.text
            assert reload.json()["version"] == v1  # the reload (or a poll just before it) is done on return
            reload_answered_s = time.monotonic() - switch_2
            time.sleep(2)
        finally:
            stop_traffic.set()
            for thread in threads:
                thread.join(timeout=60)
            set_alias(NAME, v1, "champion")

    assert not failures, failures[:5]
    coverage = {v1: 0.9, v2: 0.8}
    for _, _, _, versions, cov in records:
        assert len(versions) == 1, f"one response, several versions: {versions}"
        assert cov == pytest.approx(coverage[versions[0]]), "a response names a version that did not compute it"
    for k in range(THREADS):  # each client sees v1 ... v1, v2 ... v2, v1 ... v1: never back and forth
        seq = [versions[0] for t, _, _, versions, _ in records if t == k]
        runs = [v for i, v in enumerate(seq) if i == 0 or seq[i - 1] != v]
        assert runs == [v1, v2, v1], f"thread {k} saw versions in the order {runs}"
    phases = Counter("v2" if versions == (v2,) else ("v1 before" if done < switch_2 else "v1 after")
                     for _, done, _, versions, _ in records)
    assert min(phases.values()) >= 20 and len(phases) == 3, phases
    figures = {"threads": THREADS, "requests": len(records), "failed": len(failures), "v1": v1, "v2": v2,
               "served_by_v1_before": phases["v1 before"], "served_by_v2": phases["v2"],
               "served_by_v1_after_reload": phases["v1 after"], "poll_pickup_s": round(picked_up_s, 2),
               "reload_answered_s": round(reload_answered_s, 2), "reload_did_switch": reload.json()["reloaded"]}
    print("\nRELIABILITY hot-reload " + json.dumps(figures))
