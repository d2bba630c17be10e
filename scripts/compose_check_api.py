"""The API half of scripts/compose-check.sh: drives a running compose stack from the host.

Standard library only (it runs on the host's python3, not in the project's virtualenv). It
trains on the sample through the API, classifies the unlabelled sample and restarts the model
worker's container while that job runs, then checks that every item was processed exactly once
(API, database), the accuracy against the sample's truth, the web's and the worker's
``/metrics`` and Flower. Last, it kills the model worker in the middle of another job and checks
that the stale-job sweeper sends the batch it lost again, each item still processed once. Each
check prints one line with how long it took; the first failure ends the run with exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

TERMINAL = ("succeeded", "failed", "cancelled")
MIN_ACCURACY = 0.85  # the sample's image and audio together give nearly every label
RESTART_AT = 0.25  # the share of the classify job done when the model worker is restarted


class CheckFailed(Exception):
    pass


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url.rstrip("/"), key

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers=dict(headers or {}))
        if auth:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        status, body = self.request(method, path, **kwargs)
        if status != expect:
            raise CheckFailed(f"{method} {path}: HTTP {status}, expected {expect}: {body[:500]!r}")
        return json.loads(body)

    def submit(self, archive: Path, fields: dict[str, str]) -> dict[str, Any]:
        """POST /api/v1/jobs as a browser or curl would: multipart, the archive as a file."""
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                 f"{value}\r\n".encode() for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; '
                     f'filename="{archive.name}"\r\nContent-Type: application/gzip\r\n\r\n'
                     .encode() + archive.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.json("POST", "/api/v1/jobs", expect=202, body=b"".join(parts),
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def wait(self, job_id: str, timeout: float,
             until: Callable[[dict[str, Any]], bool] = lambda job: job["state"] in TERMINAL
             ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.json("GET", f"/api/v1/jobs/{job_id}")
            if until(job) or job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise CheckFailed(f"job {job_id} still {job['state']} after {timeout:.0f} s: "
                                  f"{job['done']} done, {job['failed']} failed of {job['total']}")
            time.sleep(0.5)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = ""
        while True:
            page = self.json("GET", f"/api/v1/jobs/{job_id}/results?limit=1000{cursor}")
            items += page["items"]
            if not page["next_cursor"]:
                return items
            cursor = f"&cursor={page['next_cursor']}"


class Compose:
    """The stack's `docker-compose … ` command line, for exec and restart."""

    def __init__(self, command: str) -> None:
        self.base = shlex.split(command)

    def run(self, *args: str) -> str:
        out = subprocess.run([*self.base, *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise CheckFailed(f"{' '.join(args[:3])}…: exit {out.returncode}: "
                              f"{out.stderr.strip()[-800:]}")
        return out.stdout

    def http_inside(self, service: str, url: str) -> str:
        """GET ``url`` from inside a service's container (ports that are not published)."""
        return self.run("exec", "-T", service, "python3", "-c",
                        "import sys, urllib.request; "
                        f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10)"
                        ".read().decode())")

    def sql(self, query: str) -> str:
        return self.run("exec", "-T", "postgres", "psql", "-U", "mmbatch", "-d", "mmbatch",
                        "-tAc", query).strip()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def step(what: str, fn: Callable[[], str | None]) -> None:
    start = time.monotonic()
    detail = fn()
    print(f"  ok  {what:<62} {time.monotonic() - start:7.1f} s" + (f"  {detail}" if detail else ""),
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the web service from the host")
    ap.add_argument("--flower", required=True, help="Flower from the host")
    ap.add_argument("--key", required=True, help="an API key")
    ap.add_argument("--sample", required=True, type=Path, help="mmbatch sample's directory")
    ap.add_argument("--compose", required=True, help="the docker-compose command line")
    ap.add_argument("--model-worker", required=True, help="the service on the model queue")
    ap.add_argument("--kill-sample", required=True, type=Path,
                    help="another sample's directory (content the workers have not seen)")
    ap.add_argument("--sweep-override", required=True, type=Path,
                    help="the compose file that makes the stale-job sweeper quick")
    ap.add_argument("--timeout", type=float, default=900.0, help="per job, seconds")
    args = ap.parse_args()
    api, compose = Api(args.url, args.key), Compose(args.compose)
    state: dict[str, Any] = {}

    def train() -> str:
        job = api.submit(args.sample / "sample_train.tar.gz", {"kind": "train",
                                                               "name": "compose-check"})
        job = api.wait(job["id"], args.timeout)
        if job["state"] != "succeeded" or job["model"] is None:
            raise CheckFailed(f"train job {job['id']} ended {job['state']}: {job['error']}")
        model = api.json("GET", f"/api/v1/models/{job['model']['id']}")
        state["model"] = model["id"]
        val = model["metrics"].get("val_accuracy")
        return f"{job['done']} items, model {model['id']}, validation accuracy {val:.3f}"

    def classify_with_restart() -> str:
        job = api.submit(args.sample / "sample_unlabelled.tar.gz",
                         {"kind": "classify", "model": str(state["model"])})
        job = api.wait(job["id"], args.timeout, until=lambda j: j["state"] == "running" and
                       j["done"] + j["failed"] >= RESTART_AT * j["total"])
        if job["state"] != "running":
            raise CheckFailed(f"classify job {job['id']} was {job['state']} before the restart "
                              "(too fast to restart mid-job: give the sample more items)")
        at = job["done"]
        t0 = time.monotonic()
        compose.run("restart", "-t", "60", args.model_worker)
        restarted = time.monotonic() - t0
        state["job"] = api.wait(job["id"], args.timeout)
        state["job_at_restart"] = (at, job["total"])
        return f"restarted {args.model_worker} at {at}/{job['total']} done ({restarted:.1f} s)"

    def once_and_right(job: dict[str, Any], sample: Path) -> str:
        """The job succeeded with one ok result per item (API and database), accurately."""
        if job["state"] != "succeeded":
            raise CheckFailed(f"classify job {job['id']} ended {job['state']}: {job['error']}")
        if job["done"] != job["total"] or job["failed"]:
            raise CheckFailed(f"classify job counters: {job['done']} done, {job['failed']} "
                              f"failed of {job['total']}")
        items = api.results(job["id"])
        keys = [item["key"] for item in items]
        if len(items) != job["total"] or len(set(keys)) != len(keys):
            raise CheckFailed(f"{len(items)} results for {job['total']} items, "
                              f"{len(set(keys))} distinct keys")
        bad = [item for item in items if item["status"] != "ok"]
        if bad:
            raise CheckFailed(f"{len(bad)} results not ok, e.g. {bad[0]}")
        rows = compose.sql(f"SELECT count(*), count(DISTINCT item_id) FROM results "
                           f"WHERE job_id = '{job['id']}'")
        if rows != f"{job['total']}|{job['total']}":
            raise CheckFailed(f"database: results, distinct items = {rows!r}, "
                              f"expected {job['total']} of each")
        with open(sample / "sample_unlabelled_truth.csv", newline="") as f:
            truth = {row["key"]: row["label"] for row in csv.DictReader(f)}
        right = sum(truth.get(item["key"]) == item["label"] for item in items)
        accuracy = right / len(items)
        if accuracy < MIN_ACCURACY:
            raise CheckFailed(f"accuracy {accuracy:.3f} against the truth, below {MIN_ACCURACY}")
        return f"{len(items)} results, one per item (API and database); accuracy {accuracy:.3f}"

    def each_item_once() -> str:
        return once_and_right(state["job"], args.sample)

    def killed_and_swept() -> str:
        """SIGKILL, not a warm stop: the batch in hand stays unacknowledged in Redis (sent again
        only after its one-hour visibility timeout), and the stale-job sweeper must send it.
        beat and worker-cpu are recreated with a sweeper that acts within seconds."""
        swept = Compose(f"{args.compose} -f {shlex.quote(str(args.sweep_override))}")
        swept.run("up", "-d", "--no-deps", "--no-build", "beat", "worker-cpu")
        job = api.submit(args.kill_sample / "sample_unlabelled.tar.gz",
                         {"kind": "classify", "model": str(state["model"])})
        job = api.wait(job["id"], args.timeout, until=lambda j: j["state"] == "running" and
                       j["done"] + j["failed"] >= RESTART_AT * j["total"])
        if job["state"] != "running":
            raise CheckFailed(f"classify job {job['id']} was {job['state']} before the kill")
        at = job["done"]
        compose.run("kill", "-s", "SIGKILL", args.model_worker)
        t0 = time.monotonic()
        # `docker kill` counts as a manual stop: the restart policy leaves the container down
        compose.run("start", args.model_worker)
        job = api.wait(job["id"], args.timeout)
        took = time.monotonic() - t0
        detail = once_and_right(job, args.kill_sample)
        sent = sum(int(n) for n in re.findall(r"sweep stale=\d+ ingest=\d+ batches=(\d+)",
                                              swept.run("logs", "--no-color", "worker-cpu")))
        return (f"killed {args.model_worker} at {at}/{job['total']}, done {took:.0f} s later; "
                f"batches the sweeper sent again: {sent}; {detail}")

    def worker_metrics() -> str:
        text = compose.http_inside(args.model_worker, "http://127.0.0.1:9808/metrics")
        after = metric(text, "mmbatch_worker_items_processed_total")
        at, total = state["job_at_restart"]
        if after <= 0:
            raise CheckFailed("the restarted model worker processed nothing "
                              f"(mmbatch_worker_items_processed_total {after})")
        if metric(text, "mmbatch_broker_up") != 1:
            raise CheckFailed("the model worker's mmbatch_broker_up is not 1")
        return f"the restarted worker processed {after:.0f} items ({total - at} were left)"

    def web_metrics() -> str:
        status, body = api.request("GET", "/metrics", auth=False)
        if status != 200:
            raise CheckFailed(f"GET /metrics: HTTP {status}")
        text = body.decode()
        posted = metric(text, "mmbatch_http_requests_total", method="POST",
                        route="/api/v1/jobs", status="202")
        polled = metric(text, "mmbatch_http_requests_total", method="GET",
                        route="/api/v1/jobs/<job_id>", status="200")
        if posted < 2 or polled < 2:
            raise CheckFailed(f"/metrics counts {posted} job submissions and {polled} polls")
        return f"{posted:.0f} submissions, {polled:.0f} polls counted"

    def flower() -> str:
        with urllib.request.urlopen(args.flower + "/healthcheck", timeout=10) as resp:
            if resp.read().strip() != b"OK":
                raise CheckFailed("Flower's /healthcheck did not answer OK")
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(args.flower + "/metrics", timeout=30) as resp:
                text = resp.read().decode()
            seen = {task: metric(text, "flower_events_total", task=task, type="task-succeeded")
                    for task in ("mmbatch.ingest", "mmbatch.process_batch", "mmbatch.train")}
            if all(seen.values()):
                break
            if time.monotonic() > deadline:
                raise CheckFailed(f"Flower saw these tasks succeed: {seen}")
            time.sleep(2)
        online = re.findall(r'flower_worker_online\{worker="([^"]+)"\} 1\.0', text)
        return f"tasks succeeded: {', '.join(f'{k} {v:.0f}' for k, v in seen.items())}; " \
               f"workers online: {', '.join(sorted(online))}"

    try:
        step("train on the sample (POST /api/v1/jobs from the host)", train)
        step("classify the unlabelled sample, model worker restarted", classify_with_restart)
        step("the classify job succeeded, every item processed once", each_item_once)
        step("worker /metrics (after its restart)", worker_metrics)
        step("web /metrics", web_metrics)
        step("Flower sees the workers' tasks", flower)
        step("model worker killed mid-job, its batch sent again", killed_and_swept)
    except CheckFailed as exc:
        print(f"  FAILED  {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
