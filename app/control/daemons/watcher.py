"""The liveness watcher (``asrctl watch``, a supervisord program when ``liveness = true``).

What Kubernetes' livenessProbe does in a cluster, on one host: every ``liveness_interval_seconds`` it
asks each running instance for ``/health`` with a ``liveness_timeout_seconds`` deadline (the probe is
answered by a request thread of its own, so a long inference does not delay it). Once an instance
has been ready (as a startupProbe would, the model load is not judged), ``liveness_failures`` misses
in a row mean it is frozen or deadlocked: its gunicorn master is
killed (its worker dies with it, so nginx sees the requests it held fail and resends them to another
instance), it leaves nginx's upstream, supervisord restarts it, and it rejoins once ``/ready`` answers
from the process supervisord started.

The job runner is watched the same way, by its heartbeat file (``app.jobs.beat``) instead of a probe:
a runner that has not beaten for ``Settings.runner_stall_seconds`` (counted from its start until it
first beats) is killed through supervisord, which restarts it; the job resumes with its undecoded chunks.

Each tick also looks for nginx workers a killed nginx master left on the public port and retires them
once the new master's workers listen, and, after a killed supervisord, finishes the adoption of its
orphans (the systemd path: the unit's render planned it, nobody else is there to finish it).
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import requests

from app.config import Settings
from app.control.act import heal, processes
from app.control.act.actuator import ActuationError, Actuator, check_answering_process, wait_ready
from app.control.paths import RunPaths
from app.control.plan.pool import Pool, save_unhealthy
from app.control.render.files import JOBS_PROGRAM, NGINX_PROGRAM

log = logging.getLogger("asr.watch")

# How often to look for orphaned nginx workers when nginx's pid has not changed (they can only
# appear when the master is replaced, which the pid shows at once).
ORPHAN_SCAN_SECONDS = 10.0


class Watcher:
    def __init__(self, settings: Settings, actuator: Actuator):
        self.settings = settings
        self.actuator = actuator
        self.client = actuator.client
        self.paths = RunPaths.at(settings.run_dir)
        self.misses: dict[str, int] = {}
        # name -> the pid that has been ready once: like Kubernetes' startupProbe, an instance is only
        # judged live or not after its model has loaded (a load can hold it up on a busy host).
        self.live: dict[str, int] = {}
        self.restarting: dict[str, tuple[int, float]] = {}   # name -> (killed pid, when)
        self.nginx_pid: int | None = None
        self.last_scan = 0.0
        self.scan_until = 0.0
        self.retiring: dict[processes.Proc, float] = {}       # orphan -> graceful deadline
        self.runner_killed: int | None = None                 # the stalled runner pid last killed
        self._stop = threading.Event()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        # Marks a previous watcher left (it stopped mid-restart) would keep an instance out of nginx
        # with nobody to bring it back; a restarting instance answers 503 meanwhile, which nginx retries.
        pool = Pool.load(self.paths)
        if pool and pool.unhealthy:
            try:
                self._set_unhealthy(pool, None, False)
            except Exception as e:  # noqa: BLE001 - the loop below retries nothing of this; say it
                log.warning("could not put %s back in nginx's upstream: %s", ", ".join(sorted(pool.unhealthy)), e)
        log.info("watching every %.1f s: /health within %.1f s, %d misses in a row restart an instance",
                 self.settings.liveness_interval_seconds, self.settings.liveness_timeout_seconds,
                 self.settings.liveness_failures)
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the watcher must outlive any one bad tick
                log.warning("tick failed: %s: %s", type(e).__name__, e)
            self._stop.wait(self.settings.liveness_interval_seconds)

    def tick(self) -> None:
        pool = Pool.load(self.paths)
        if pool is None:
            return
        if pool.adopted:
            heal.finish_adoption(self.settings, self.client, pool, self.actuator.publish,
                                 lambda specs: wait_ready(self.client, specs, self.settings.request_timeout_seconds),
                                 log.info)
        programs = self.client.processes()
        self._watch_nginx(programs.get(NGINX_PROGRAM))
        self._watch_runner(programs.get(JOBS_PROGRAM))
        for spec in pool.instances:
            info = programs.get(spec.name)
            if spec.name in self.restarting:
                self._maybe_rejoin(pool, spec, info)
            elif info and info["statename"] == "RUNNING" and spec.name not in pool.starting | pool.draining:
                self._probe(pool, spec, info)
            else:
                self.misses.pop(spec.name, None)

    # -- instances --

    def _probe(self, pool: Pool, spec, info: dict) -> None:
        health = probe(spec.port, self.settings.liveness_timeout_seconds)
        if health is not None:
            self.misses.pop(spec.name, None)
            if health.get("state") in ("ready", "draining"):
                self.live[spec.name] = info["pid"]
            return
        if self.live.get(spec.name) != info["pid"]:
            return  # still starting (loading its model, on a busy host maybe slow to answer): not judged yet
        misses = self.misses[spec.name] = self.misses.get(spec.name, 0) + 1
        if misses >= self.settings.liveness_failures:
            self._restart(pool, spec, info)

    def _restart(self, pool: Pool, spec, info: dict) -> None:
        pid = info["pid"]
        log.warning("%s (pid %d) missed %d /health probes of %.1f s in a row: killing it; supervisord "
                    "restarts it, nginx resends its requests elsewhere", spec.name, pid,
                    self.misses[spec.name], self.settings.liveness_timeout_seconds)
        # KILL reaches a stopped process too; the worker follows its master (PR_SET_PDEATHSIG).
        self.client.signal(spec.name, "KILL")
        self.misses.pop(spec.name, None)
        self.restarting[spec.name] = (pid, time.monotonic())
        self._set_unhealthy(pool, spec.name, True)
        log.info("%s: out of nginx's upstream until it is ready again", spec.name)

    def _maybe_rejoin(self, pool: Pool, spec, info: dict | None) -> None:
        old_pid, since = self.restarting[spec.name]
        if info and info["statename"] in ("FATAL", "EXITED", "STOPPED", "BACKOFF") and time.monotonic() - since > 5:
            try:
                self.client.start(spec.name)
            except Exception as e:  # noqa: BLE001 - logged; the next tick tries again
                log.warning("%s: could not be started: %s", spec.name, e)
            return
        if not info or info["statename"] != "RUNNING" or info["pid"] == old_pid:
            return
        ready = _get(spec.port, "/ready", 2)
        if ready is None or ready.status_code != 200:
            return
        try:
            check_answering_process(self.client, spec.name, spec.port)
        except ActuationError as e:
            log.warning("%s", e)
            return
        self._set_unhealthy(pool, spec.name, False)
        del self.restarting[spec.name]
        log.info("%s (pid %d) ready again after %.1f s and back in nginx's upstream", spec.name, info["pid"],
                 time.monotonic() - since)

    def _set_unhealthy(self, pool: Pool, name: str | None, out: bool) -> None:
        """Take ``name`` out of nginx's upstream or put it back (None: put every one back)."""
        with heal.control_lock(self.paths):
            names = set(pool.unhealthy)
            names = names | {name} if out else names - {name} if name else set()
            save_unhealthy(self.paths, names)
            self.actuator.publish(Pool.load(self.paths))

    # -- the job runner --

    def _watch_runner(self, info: dict | None) -> None:
        """Kill (through supervisord, which restarts it) a job runner whose heartbeat went stale."""
        from app import jobs

        if not info or info["statename"] != "RUNNING" or info["pid"] == self.runner_killed:
            return
        beat = jobs.last_beat(jobs.heartbeat_path(self.settings))
        # Its own last beat; until its first one, its start (a runner stuck from the start is stalled too).
        since = beat[1] if beat and beat[0] == info["pid"] else info["start"]
        silent = time.time() - since
        if silent <= self.settings.runner_stall_seconds:
            return
        if self.client.process(JOBS_PROGRAM)["pid"] != info["pid"]:
            return  # restarted meanwhile: the new one is judged from its own start
        log.warning("job runner (pid %d) has not beaten for %.0f s (limit %.0f s): killing it; supervisord "
                    "restarts it and its job resumes", info["pid"], silent, self.settings.runner_stall_seconds)
        self.client.signal(JOBS_PROGRAM, "KILL")
        self.runner_killed = info["pid"]

    # -- nginx --

    def _watch_nginx(self, info: dict | None) -> None:
        pid = info["pid"] if info and info["statename"] == "RUNNING" else None
        now = time.monotonic()
        changed = pid != self.nginx_pid
        self.nginx_pid = pid
        for orphan, deadline in list(self.retiring.items()):
            if not processes.alive([orphan]):
                del self.retiring[orphan]
            elif now > deadline:
                if processes.send(orphan, signal.SIGKILL):
                    log.warning("nginx orphan pid %d still running after its graceful stop: killed it", orphan.pid)
                del self.retiring[orphan]
        if changed:
            self.scan_until = now + ORPHAN_SCAN_SECONDS  # look every tick for a while after a new master
        if pid is None or not (now < self.scan_until or now - self.last_scan > ORPHAN_SCAN_SECONDS):
            return
        self.last_scan = now
        retiring = {p.pid for p in self.retiring}
        found = [p for p in heal.nginx_orphans(self.settings, self.paths, pid) if p.pid not in retiring]
        if not found or not heal.supervised_nginx_listens(self.settings, pid):
            return  # none, or the new master is not serving yet: the orphans are all there is
        found = [p for p in found if processes.send_graceful(p)]
        for p in found:
            self.retiring[p] = now + self.settings.stop_wait_seconds
        if not found:
            return
        log.warning("nginx: retiring %d orphaned worker(s) %s gracefully; the supervised master is pid %d%s",
                    len(found), ", ".join(str(p.pid) for p in found), pid, heal.reset_risk())


def probe(port: int, timeout: float) -> dict | None:
    """The instance's /health within ``timeout``, or None."""
    r = _get(port, "/health", timeout)
    if r is None or r.status_code != 200:
        return None
    try:
        return r.json()
    except ValueError:
        return None


def _get(port: int, path: str, timeout: float):
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)
    except requests.RequestException:
        return None
