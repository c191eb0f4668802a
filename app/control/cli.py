"""``asrctl``: bring the service up and down, show its state, render and reload its configuration.

Settings come from one place (``app.config``): defaults < ``--config`` file (or the run directory's
own ``asr.toml`` from an earlier ``up``) < ``ASR_*`` environment < flags.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import select
import sys
import time
import xmlrpc.client
from pathlib import Path

import requests

from app.config import ConfigError, Settings, load_settings
from app.control.act import heal, nginx, processes
from app.control.act.actuator import ActuationError, Actuator, get_json, wait_ready
from app.control.paths import RunPaths
from app.hardware.nvml import detect_gpus, inventory
from app.control.plan.placement import NoRoomError
from app.control.plan.pool import Pool, save_unhealthy
from app.control.render.files import (
    CONTROL_PROGRAMS, JOBS_PROGRAM, NGINX_PROGRAM, InstanceSpec, plan_instances, render_all,
)
from app.control.act.supervisor import SupervisorClient, SupervisorError, start_supervisord
from app.engines import ENGINE_MODULES, engine_bin_dir, engine_environment, missing_modules
from app.engines.models import display_name, resolve_model

# Flags that map one-to-one onto settings.
SETTING_FLAGS = {
    "instances": int, "port": int, "base_port": int, "host": str, "engine": str, "model": str,
    "device": str, "compute_type": str, "beam_size": int, "max_audio_seconds": float, "max_queue": int,
    "weights": str, "gpu_map": str, "cpu_threads": int, "aligner_model": str, "chunk_seconds": float,
    "gpus_per_instance": int,
}


class CommandError(RuntimeError):
    """A failure to report in one line, with a non-zero exit."""


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Whoever read our output went away (`asrctl status | head`): nothing to say, nobody to say it
        # to. Exit as a process SIGPIPE ends would, without a traceback at the interpreter's last flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, ConfigError, SupervisorError, ActuationError, processes.PortHeld,
            nginx.NginxConfigError, nginx.NginxNotVerified) as e:
        message = str(e)
    except xmlrpc.client.Fault as e:
        message = f"supervisord refused the request: {e.faultString}"
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, BrokenPipeError) and _reader_gone():
            raise  # our own stdout, not supervisord or an instance
        message = f"supervisord or an instance did not answer ({type(e).__name__}: {e})"
    print(f"asrctl {args.command}: {message}", file=sys.stderr)
    return 1


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


# -- commands ---------------------------------------------------------------------------------------

def cmd_up(args) -> int:
    settings = _settings(args)
    if engine_bin_dir(settings.engine, settings.engine_environment) is None:
        missing = " and ".join(missing_modules(settings.engine) or ENGINE_MODULES[settings.engine])
        env = engine_environment(settings.engine, settings.engine_environment)
        if env is not None and env != Path(sys.prefix):
            raise CommandError(f"engine {settings.engine} needs {missing}, which neither this environment nor "
                               f"{env} has: scripts/setup.sh --engine {settings.engine} installs it")
        raise CommandError(f"engine {settings.engine} needs {missing}, which this environment lacks: "
                           "scripts/setup.sh installs them (or pip install -e '.[transformers]')")
    # The transformers engine's copy of the embedded model is converted once here, not by N
    # instances racing at start.
    resolve_model(settings.engine, settings.model, settings.model_cache)
    paths = RunPaths.at(settings.run_dir)
    client = SupervisorClient(paths.socket)
    found = inventory()
    gpus = found.gpus
    say = lambda m: _say(args, m)  # noqa: E731
    if client.running():
        pool = Pool.load(paths) or Pool(plan_instances(settings, gpus, nvml_error=found.error))
        actuator = Actuator(settings, client, gpus, log=say)
        _say(args, f"updated running service: {_describe_changes(actuator.publish(pool))}")
        if args.instances is not None:
            actuator.scale_to(pool, args.instances)
    else:
        # Orphans of a killed supervisord keep serving while their replacements start on fresh ports.
        previous = Pool.load(paths)
        try:
            pool = Pool(plan_instances(settings, gpus, nvml_error=found.error))
        except NoRoomError as e:   # (not any other error: the hint is about the orphans' memory)
            raise NoRoomError(f"{e}{heal.orphans_holding_gpus(settings, previous)}") from e
        # Before any signal or file: a port another process holds is refused, never taken.
        processes.refuse_foreign(paths, heal.run_ports(settings, pool), "asrctl up")
        heal.plan_adoption(settings, pool, say, previous=previous)
        _render(settings, pool, before_start=True)
        client = start_supervisord(paths)
        actuator = Actuator(settings, client, gpus, log=say)
        heal.finish_adoption(settings, client, pool, actuator.publish,
                             lambda specs: wait_ready(client, specs, args.timeout), say)
    wait_ready(client, pool.instances, args.timeout)
    _wait_public(settings, args.timeout)
    nginx.verify(settings, paths)
    if not args.quiet:
        _print_summary(settings, pool.instances)
    return 0


def cmd_down(args) -> int:
    """Stop everything of this run directory, from whatever state it is in: supervisord's programs in
    order (nginx gracefully first, then the instances), then any process of the run a killed nginx
    master or supervisord left behind, until none is left. Only processes carrying the run's identity
    are signalled (app/control/act/processes.py); a port held by anything else is reported, not touched."""
    settings = _settings(args, from_run_dir=True)
    paths = RunPaths.at(settings.run_dir)
    ports = heal.run_ports(settings, Pool.load(paths))
    client = SupervisorClient(paths.socket)
    supervised = False
    instances, nginx_ran = [], False
    # A stopped (SIGSTOP) process cannot finish anything or even take its TERM: let every one go on.
    processes.resume(processes.run_processes(paths, ports))
    if client.running():
        supervised = True
        supervisord_pid = client.api.getPID()
        programs = client.processes()
        running = {name for name, p in programs.items() if p["statename"] in ("RUNNING", "STARTING", "BACKOFF")}
        nginx_ran = NGINX_PROGRAM in running
        for name in (*CONTROL_PROGRAMS, NGINX_PROGRAM):  # nothing may add work while instances stop
            if name in programs:
                client.stop(name)
        for name in programs:
            if name not in (*CONTROL_PROGRAMS, NGINX_PROGRAM):
                client.stop(name)
                if name in running:
                    instances.append(name)
        client.shutdown()
        # supervisord removes its socket before it exits: wait for the process itself (bounded), so
        # that its last moments are not taken for a process it left behind.
        processes.wait_gone([supervisord_pid], settings.stop_wait_seconds)
    retired: list[processes.Proc] = []
    for _round in range(3):  # a stopped supervisord's own orphans show up once it is gone
        left = processes.orphans(paths, ports, None, include_control=True)
        if not left:
            break
        # nginx first, so that no request reaches an instance that is stopping.
        for group in ([p for p in left if p.kind == "nginx"], [p for p in left if p.kind != "nginx"]):
            if group:
                retired += processes.retire(group, settings.stop_wait_seconds, log=lambda m: _say(args, m))
    left = processes.orphans(paths, ports, None, include_control=True)
    if left:
        raise CommandError(f"could not stop everything of {paths.root}: still running: "
                           f"{', '.join(p.describe() for p in left)}")
    foreign = processes.foreign_holders(paths, ports)
    others = "".join(
        f"; port {port} is held by {f'pid {pids[0]} ({processes.program_of(pids[0])})' if pids else 'another user'}"
        ", which is not part of this run and was left alone" for port, pids in foreign.items())
    if not supervised and not retired:
        _say(args, f"not running (no supervisord on {paths.socket}, no process of {paths.root}){others}")
        return 0
    done = [f"stopped {len(instances)} instance(s){' and nginx' if nginx_ran else ''}"] if supervised else []
    if retired:
        done.append(f"retired {len(retired)} process(es) of this run that supervisord did not hold "
                    f"({', '.join(p.describe() for p in retired)})")
    free = sorted(ports - set(foreign))
    _say(args, f"{'; '.join(done)}; nothing of {paths.root} is left running"
               f"{', and ports ' + ', '.join(map(str, free)) + ' are free' if free else ''}{others}")
    return 0


def cmd_status(args) -> int:
    settings = _settings(args, from_run_dir=True)
    client = SupervisorClient(RunPaths.at(settings.run_dir).socket)
    if not client.running():
        paths = RunPaths.at(settings.run_dir)
        left = processes.orphans(paths, heal.run_ports(settings, Pool.load(paths)), None, include_control=True)
        if args.json:
            print(json.dumps({"running": False, "instances": [],
                              "orphans": [{"pid": p.pid, "kind": p.kind, "ports": p.ports} for p in left]}))
        elif left:
            print(f"supervisord is not running, but {len(left)} process(es) of this run directory still run "
                  f"unsupervised: {', '.join(p.describe() for p in left)}; `asrctl up` adopts them, "
                  "`asrctl down` stops them")
        else:
            print("not running")
        return 3
    rows = instance_status(client)
    jobs = job_counts(settings)
    gpus = inventory()
    if args.json:
        print(json.dumps({"running": True, "public": f"http://{nginx.public_host(settings)}:{settings.port}",
                          "instances": rows, "gpus": [g.as_dict() for g in gpus.gpus],
                          "nvml_error": gpus.error or None, "jobs": jobs}, indent=2))
    else:
        print(f"{'NAME':<12} {'PORT':>5}  {'DEVICE':<10} {'STATE':<9} {'READY':<5} {'PID':>7} {'UPTIME':>8}  GPU")
        for r in rows:
            print(f"{r['name']:<12} {r['port'] or '-':>5}  {r['device'] or '-':<10} {r['state']:<9} "
                  f"{'yes' if r['ready'] else 'no':<5} {r['pid'] or '-':>7} {_duration(r['uptime_seconds']):>8}  "
                  f"{_gpu_column(r['gpu'])}")
        _print_gpus(gpus, any(r["device"] == "cuda" for r in rows))
        if jobs is not None:
            print("JOBS  " + "  ".join(f"{state} {n}" for state, n in jobs.items()))
    return 0 if all(r["ready"] for r in rows if r["port"]) else 2


def cmd_render(args) -> int:
    settings = _settings(args)
    paths = RunPaths.at(settings.run_dir)
    found = inventory()
    pool = Pool.load(paths) or Pool(plan_instances(settings, found.gpus, nvml_error=found.error))
    before_start = not SupervisorClient(paths.socket).running()
    if before_start:
        # About to be started (the systemd unit's ExecStartPre): plan around a killed supervisord's
        # orphans; the watcher finishes the adoption once supervisord runs. A port another process
        # holds fails the start instead.
        processes.refuse_foreign(paths, heal.run_ports(settings, pool), "asrctl render")
        heal.plan_adoption(settings, pool, lambda m: _say(args, m), previous=pool)
    _render(settings, pool, before_start)
    _say(args, f"rendered configuration into {paths.root}")
    return 0


def cmd_reload(args) -> int:
    settings = _settings(args, from_run_dir=True)
    client, pool, actuator = _running(settings, args)
    changes = actuator.publish(pool)
    wait_ready(client, pool.instances, args.timeout)
    _say(args, f"reloaded: {_describe_changes(changes)}")
    return 0


def cmd_scale(args) -> int:
    settings = _settings(args, from_run_dir=True)
    _client, pool, actuator = _running(settings, args)
    current = len(pool.instances)
    target = current + int(args.count) if args.count[0] in "+-" else int(args.count)
    if not settings.min_instances <= target <= settings.max_instances:
        raise CommandError(f"{target} instances is outside min_instances={settings.min_instances}.."
                           f"max_instances={settings.max_instances}")
    actuator.scale_to(pool, target)
    _say(args, f"{current} -> {len(pool.instances)} instances: {', '.join(i.name for i in pool.instances)}")
    return 0


def cmd_systemd_unit(args) -> int:
    """Print the systemd unit that runs this service under supervisord (install it as root)."""
    import getpass

    from app.control.render.systemd import render_unit

    settings = _settings(args)
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SETTING_FLAGS
             if getattr(args, name, None) is not None]
    if args.config:
        flags.insert(0, f"--config={Path(args.config).resolve()}")
    print(render_unit(settings, args.user or getpass.getuser(), Path.cwd(), Path(sys.executable).parent,
                      flags=flags), end="")
    return 0


def cmd_restart(args) -> int:
    settings = _settings(args, from_run_dir=True)
    client, pool, actuator = _running(settings, args)
    if len(pool.instances) < 2 and args.rolling:
        _say(args, "one instance: a rolling restart cannot keep serving; restarting it anyway")
    if args.rolling:
        for spec in list(pool.instances):
            actuator.restart(pool, spec.name)
    else:  # all at once: nginx answers 503 with Retry-After until one is ready again
        for spec in pool.instances:
            client.stop(spec.name)
        for spec in pool.instances:
            client.start(spec.name)
        wait_ready(client, pool.instances, args.timeout)
    if JOBS_PROGRAM in client.processes():
        # New code for the runner too: it stores chunks in flight before it stops; jobs resume.
        client.stop(JOBS_PROGRAM)
        client.start(JOBS_PROGRAM)
    _say(args, f"restarted {len(pool.instances)} instance(s){' one at a time' if args.rolling else ''}"
               f"{' and the job runner' if JOBS_PROGRAM in client.processes() else ''}")
    return 0


def cmd_watch(args) -> int:
    from app.control.daemons.watcher import Watcher

    settings, _pool, actuator = _control_program(args, "asr.watch")
    Watcher(settings, actuator).run()
    return 0


def cmd_autoscale(args) -> int:
    from app.control.daemons.autoscaler import Autoscaler

    settings, pool, actuator = _control_program(args, "asr.autoscale")
    autoscaler = Autoscaler(settings, actuator)
    if args.once:
        autoscaler.tick(pool, dry_run=args.dry_run)
    else:
        autoscaler.run(pool, dry_run=args.dry_run)
    return 0


def cmd_jobs(args) -> int:
    """This run's async jobs: list them, cancel one, or retry a failed one (by id, or by the short
    ref logs name it by). Reads and writes the run directory's job database; each change is read
    back before it is reported."""
    from app import jobs
    from app.jobs.store import CANCELLED, FAILED, FINISHED, QUEUED

    settings = _settings(args, from_run_dir=True)
    path = jobs.db_path(settings)
    if not path.exists():
        if args.action == "list":
            print("[]" if args.json else f"no jobs (no job database in {settings.jobs_dir})")
            return 0
        raise CommandError(f"no job database in {settings.jobs_dir}: no job was ever submitted to this run")
    store = jobs.JobStore(path)
    if args.action == "list":
        listed = store.jobs()
        if args.json:
            print(json.dumps([{"ref": jobs.ref(j.id), "id": j.id, "state": j.state, "created": j.created,
                               "duration": j.duration, "done_seconds": j.done_seconds, "error": j.error,
                               "owner": j.owner[:12] or None} for j in listed], indent=2))
            return 0
        print(f"{'REF':<12}  {'STATE':<9}  {'SUBMITTED (UTC)':<19}  {'AUDIO':>8}  {'DONE':>5}  {'OWNER':<8}  ERROR")
        for j in listed:
            done = f"{min(1.0, j.done_seconds / j.duration):.0%}" if j.duration else "-"
            print(f"{jobs.ref(j.id):<12}  {j.state:<9}  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(j.created))}  "
                  f"{_duration(j.duration):>8}  {done:>5}  {j.owner[:8] or '-':<8}  {(j.error or '')[:100]}")
        return 0
    if not args.job:
        raise CommandError(f"jobs {args.action} needs a job: its id, or the ref `asrctl jobs` and the logs show")
    job = _find_job(store, args.job)
    name = jobs.ref(job.id)
    if args.action == "cancel":
        if job.state in FINISHED:
            raise CommandError(f"job {name} is {job.state}: there is nothing to cancel")
        after = store.cancel(job.id)
        jobs.remove_audio(settings, job.id)
        if after is None or after.state != CANCELLED:
            raise CommandError(f"job {name} was not cancelled: it is {after.state if after else 'gone'} now")
        _say(args, f"job {name} cancelled (it was {job.state}); its audio is removed")
        return 0
    if job.state != FAILED:
        raise CommandError(f"job {name} is {job.state}: only a failed job can be retried")
    if not jobs.audio_path(settings, job.id).exists():
        raise CommandError(f"job {name} cannot be retried: its audio is gone")
    after = store.retry(job.id)
    if after is None or after.state != QUEUED:
        raise CommandError(f"job {name} was not queued again: it is {after.state if after else 'gone'} now")
    client = SupervisorClient(RunPaths.at(settings.run_dir).socket)
    runner = client.processes().get(JOBS_PROGRAM) if client.running() else None
    where = ("the job runner takes it in turn" if runner and runner["statename"] == "RUNNING"
             else "the job runner is not running here: `asrctl up` starts it")
    _say(args, f"job {name} queued again, its decoded chunks kept; {where}")
    return 0


def _find_job(store, given: str):
    """The job named by its id or its ref (``app.jobs.ref``, as logs and `asrctl jobs` show it)."""
    from app import jobs

    job = store.get(given) if jobs.valid_id(given) else None
    if job is None:
        matches = [j for j in store.jobs() if jobs.ref(j.id) == given]
        job = matches[0] if len(matches) == 1 else None
    if job is None:
        raise CommandError(f"no job {given[:40]!r} in this run (a ref is the 12 characters `asrctl jobs` shows)")
    return job


# -- helpers ----------------------------------------------------------------------------------------

def _control_program(args, logger: str):
    """What a supervised control program (the watcher, the autoscaler) starts from: the run directory's
    settings, its pool and an actuator that logs to stdout (supervisord rotates it)."""
    settings = _settings(args, from_run_dir=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    _client, pool, actuator = _running(settings, args)
    actuator.log = logging.getLogger(logger).info
    return settings, pool, actuator


def instance_status(client: SupervisorClient) -> list[dict]:
    """Per program: supervisord's view plus, for model instances, the instance's own /health and /ready."""
    rows = []
    now = time.time()
    for name, p in sorted(client.processes().items()):
        port = int(name.rsplit("-", 1)[1]) if name.startswith("asr-") else None
        health = get_json(port, "/health") if port and p["statename"] == "RUNNING" else None
        ready = _get_status(port, "/ready") == 200 if health else (p["statename"] == "RUNNING" and not port)
        rows.append({
            "name": name,
            "port": port,
            "device": _device(health) if health else None,
            "gpu": health.get("gpu") if health else None,   # read inside the instance: what CUDA uses
            "state": p["statename"],
            "instance_state": health.get("state") if health else None,
            "ready": ready,
            "pid": p["pid"] or None,
            "uptime_seconds": round(now - p["start"]) if p["statename"] == "RUNNING" else 0,
        })
    return rows


def job_counts(settings: Settings) -> dict[str, int] | None:
    """Jobs by state, read from the run directory's job database (None: jobs off, or none yet)."""
    from app.jobs import counts

    return counts(settings) if settings.jobs else None


def _gpu_column(gpu: dict | None) -> str:
    """The GPU an instance computes on, as it reported it: name, UUID, memory it holds."""
    if not gpu:
        return "-"
    memory = f" {gpu['memory_mb']} MB" if gpu.get("memory_mb") is not None else ""
    more = f" and {gpu['gpus'] - 1} more GPU(s)" if (gpu.get("gpus") or 1) > 1 else ""   # tensor parallel
    return f"{gpu.get('name') or '?'} {gpu.get('uuid') or gpu.get('pinned') or '?'}{memory}{more}"


def _print_gpus(gpus, wanted: bool) -> None:
    """The host's GPUs from NVML, a fault on its own line rather than a traceback."""
    if not gpus.gpus:
        if wanted or (gpus.error and not gpus.no_driver):
            print(f"\nGPUs: no figures from NVML ({gpus.error or 'no GPU'})")
        return
    print(f"\n{'GPU':<4} {'NAME':<24} {'UUID':<40} {'MEMORY USED/TOTAL':>18} {'UTIL':>5}  NVML")
    for g in gpus.gpus:
        memory = f"{g.memory_used_mb}/{g.memory_total_mb} MB" if g.memory_total_mb is not None else "-"
        util = f"{g.utilization_pct:.0f}%" if g.utilization_pct is not None else "-"
        nvml = g.fault or (f"utilization: {g.utilization_fault}" if g.utilization_fault else "ok")
        print(f"{g.index:<4} {g.name or '?':<24} {g.uuid or '-':<40} {memory:>18} {util:>5}  {nvml}")


def _device(health: dict) -> str:
    if health["device"] == "cpu" and health.get("cpu_cores"):
        return f"cpu:{health['cpu_cores']}"
    return health["device"]


def _settings(args, from_run_dir: bool = False) -> Settings:
    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    overrides["run_dir"] = args.run_dir
    run_dir = args.run_dir or os.environ.get("ASR_RUN_DIR") or Settings.run_dir
    config = args.config
    previous = RunPaths.at(run_dir).config
    if config is None and previous.exists() and (from_run_dir or os.environ.get("ASR_CONFIG") is None):
        config = previous  # the run directory remembers what it was brought up with
    return load_settings(config, overrides=overrides)


def _render(settings: Settings, pool: Pool, before_start: bool) -> None:
    if before_start:  # nobody is restarting anything yet, so no instance stays out of nginx
        pool.unhealthy = set()
    paths = render_all(settings, pool.instances, pool.upstream)
    nginx.check_config(paths)
    pool.save(paths)
    if before_start:
        save_unhealthy(paths, set())


def _running(settings: Settings, args) -> tuple[SupervisorClient, Pool, Actuator]:
    paths = RunPaths.at(settings.run_dir)
    client = SupervisorClient(paths.socket)
    pool = Pool.load(paths)
    if not client.running() or pool is None:
        raise CommandError(f"not running (no supervisord on {paths.socket}); use asrctl up")
    return client, pool, Actuator(settings, client, detect_gpus(), log=lambda m: _say(args, m))


def _wait_public(settings: Settings, timeout: float) -> None:
    url = f"http://{nginx.public_host(settings)}:{settings.port}/ready"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise CommandError(f"nginx does not answer on {url}")
        time.sleep(0.2)


def _get_status(port: int, path: str) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
    except requests.RequestException:
        return None


def _print_summary(settings: Settings, instances: list[InstanceSpec]) -> None:
    host = nginx.public_host(settings)
    print(f"ASR service ready: {len(instances)} instance(s) of {display_name(settings.model)} "
          f"({settings.engine}) behind nginx on http://{host}:{settings.port}")
    for i in instances:
        print(f"  {i.name}  127.0.0.1:{i.port}  {i.placement.describe()}  weight={i.weight}")
    print("Try it (espeak-ng speaks a sentence into hello.wav):")
    print('  espeak-ng -v en -s 150 -w hello.wav "Ask not what your country can do for you."')
    print(f"  curl -F audio=@hello.wav http://{host}:{settings.port}/asr")
    print(f"Status: asrctl status --run-dir {settings.run_dir}   Stop: asrctl down --run-dir {settings.run_dir}")


def _describe_changes(changes: dict[str, list[str]]) -> str:
    parts = [f"{k} {', '.join(v)}" for k, v in changes.items() if v]
    return "; ".join(parts) or "no program changed"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asrctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, settings: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        p.add_argument("--run-dir", dest="run_dir", help="where configs, sockets, pids and logs live (default: run)")
        p.add_argument("--config", help="TOML settings file")
        p.add_argument("--quiet", "-q", action="store_true")
        if settings:
            for flag, kind in SETTING_FLAGS.items():
                p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind)
        return p

    for p in (command("up", cmd_up, "render configs, start supervisord, instances and nginx; wait until ready", True),
              command("reload", cmd_reload, "re-render, apply program changes, test and reload nginx", True)):
        p.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    command("render", cmd_render, "write every configuration file, start nothing", True)
    unit = command("systemd-unit", cmd_systemd_unit, "print a hardened systemd unit for this service", True)
    unit.add_argument("--user", help="the dedicated account that runs it (default: you)")
    restart = command("restart", cmd_restart, "restart the instances; --rolling: one at a time, drained first")
    restart.add_argument("--rolling", action="store_true", help="keep serving: drain, restart, rejoin each in turn")
    restart.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    scale = command("scale", cmd_scale, "grow or shrink the pool: N, +1 or -1 (drains before it stops)")
    scale.add_argument("count", help="the number of instances, or +K / -K")
    command("watch", cmd_watch, "the liveness watcher: restart an instance that stops answering /health")
    autoscale = command("autoscale", cmd_autoscale, "run the scaling policy loop (or one tick)")
    autoscale.add_argument("--once", action="store_true", help="one decision, then exit")
    autoscale.add_argument("--dry-run", action="store_true", help="log decisions, change nothing")
    command("down", cmd_down, "stop nginx, then the instances (gracefully), then supervisord and any orphan")
    status = command("status", cmd_status, "state of each program and instance")
    status.add_argument("--json", action="store_true")
    jobs_ = command("jobs", cmd_jobs, "list the async jobs of this run, cancel one, or retry a failed one")
    jobs_.add_argument("action", nargs="?", choices=("list", "cancel", "retry"), default="list")
    jobs_.add_argument("job", nargs="?", help="for cancel and retry: the job's id or ref")
    jobs_.add_argument("--json", action="store_true")
    return parser


if __name__ == "__main__":
    sys.exit(main())
