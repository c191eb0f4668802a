"""One source of truth for configuration: defaults, then a TOML file, then ``ASR_*`` environment
variables, then explicit overrides (command-line flags or a test's mapping).

Both the operator CLI and every instance read settings through ``load_settings``; ``asrctl`` writes
the resolved settings into the run directory so that each instance sees exactly what the operator
asked for, plus the few per-instance values (port, instance id, pinning) supervisord passes in the
environment.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "ASR_"
CONFIG_ENV = "ASR_CONFIG"

# Allowed on top of the audio-proportional part of an engine call: loading the window, the first step.
DECODE_START_SECONDS = 30

# Worst-case bytes per second of audio an upload may carry: uncompressed 48 kHz stereo 16-bit WAV.
_WORST_CASE_BYTES_PER_SECOND = 48_000 * 2 * 2


@dataclass
class Settings:
    # What serves: engine and model.
    engine: str = "ctranslate2"          # "ctranslate2" (faster-whisper) | "transformers" | "qwen3-asr" | "vllm"
                                         # (vllm: Qwen3-ASR through vLLM, in .venv-vllm: scripts/setup.sh --engine vllm)
    model: str = "embedded"              # "embedded" (Whisper), a model directory, or a cached hub id
    device: str = "auto"                 # "auto" | "cpu" | "cuda"
    compute_type: str = "auto"           # auto: int8 (ctranslate2) or float32 on CPU; float16 on GPU, bfloat16 for qwen3-asr
    engine_environment: str = ""         # the virtualenv whose gunicorn runs the instances; "" = asrctl's own if
                                         # it has the engine, else the engine's beside the checkout (.venv-vllm)
    aligner_model: str = ""              # qwen3-asr, vllm: a Qwen3-ForcedAligner-*-hf directory, for word timestamps
    chunk_seconds: float = 30.0          # longer audio is cut at quiet points into chunks this long at most
                                         # (app/audio/longform.py for every engine; qwen3-asr's engine too);
                                         # a live stream's turn that never pauses is cut as long
                                         # (app/audio/live.py)
    beam_size: int = 5                   # same decoding for both engines
    language: str = ""                   # default language; "" = detect where the model can

    # What a request gets when it does not say; each one can be overridden per request.
    output: str = "json"                 # /asr output: json | txt | srt | vtt | tsv
    detect_language: bool = True         # false: never detect (needs `language`); /detect-language answers 403
    word_timestamps: bool = False        # align every word (costs a little more decoding time)
    vad_filter: bool = False             # drop non-speech before the model (Silero VAD)
    # Whisper's temperature fallback for requests at temperature 0 (app/engines/fallback.py); false:
    # temperature 0 only, deterministic even where a window loops (and what tests on random weights need)
    temperature_fallback: bool = True
    # Each 30 s window primed with the text of the windows before it, as faster-whisper and whisper decode by
    # default (faster-whisper engine; the others decode each window alone); false: each window alone
    condition_on_previous_text: bool = True

    # How many instances and where they listen.
    instances: int = 2                   # model instances `asrctl up` starts
    host: str = "0.0.0.0"                # nginx, the only public entry
    port: int = 7860                     # nginx's public port
    base_port: int = 7861                # instances listen on 127.0.0.1:base_port..base_port+N-1
    run_dir: str = "run"                 # configs, socket, pids, logs and jobs: all a run writes

    # Placement: which GPU or CPU cores an instance gets.
    gpu_map: str = ""                    # e.g. "0,0,1": instance i -> GPU gpu_map[i]; "" = most free memory
    gpus_per_instance: int = 1           # vllm: GPUs one instance spans (vLLM's tensor parallelism)
    cpu_threads: int = 0                 # threads per instance on CPU; 0 = its share of the cores
    instance_gpu_memory_mb: int = 2048   # GPU memory one instance holds, until one has loaded and measured it
    gpu_headroom_mb: int = 512           # free memory a GPU keeps beyond the instances placed on it

    # Limits that size every timeout and buffer in the chain.
    max_audio_seconds: float = 600.0     # longest audio /asr accepts (413 beyond)
    max_upload_mb: float = 0.0           # 0 = derived from max_audio_seconds (uncompressed 48 kHz stereo)
    slowest_realtime_factor: float = 0.5 # worst inference seconds per audio second on this hardware
    max_queue: int = 8                   # requests an instance holds (running + waiting) before 503
    retry_after_seconds: int = 2         # Retry-After on a 503

    # Dynamic batching inside an instance (app/runtime/queue.py): one engine call for several requests.
    max_batch: int = 0                   # requests per engine call; 0 = auto: 1 on CPU, 8 on GPU,
                                         # max_queue for vllm (every waiting request; vLLM batches them)
    max_wait_ms: float = 10.0            # longest a request waits for others to fill its batch

    # Live transcription (GET /v1/realtime, app/routes/realtime.py): WebSocket streams, one instance each.
    max_streams: int = 4                 # open streams an instance holds; one more gets 503 (nginx tries the next); 0: none.
                                         # Measured (python -m bench streaming): one CPU core keeps 5 real-time
                                         # streams under 2 s from a turn's end to its transcript, with deltas
                                         # for the first 2 only; raise it on a GPU
    stream_idle_seconds: float = 60.0    # a stream that sends nothing this long, owed no transcript, is closed
    stream_max_seconds: float = 3600.0   # a stream is closed after this long, however busy
    stream_redecode_seconds: float = 1.0 # new audio in an open turn before it is decoded again (for deltas)

    # Long recordings (app/audio/longform.py): cut at pauses into chunks of chunk_seconds, decoded side by side.
    chunking: bool = True                # false: window after window on the instance that got it
    chunk_fanout: bool = True            # also send chunks to idle sibling instances (loopback)
    span_seconds: float = 120.0          # faster-whisper conditioning on previous text: chunks are equal spans of
                                         # at most this long instead, as many as a multiple of the instances'
                                         # slots, each decoded window after window; 0: chunks of chunk_seconds

    # Async jobs (app/jobs/): POST /v1/jobs, a supervised runner, SQLite + audio under run_dir/jobs.
    jobs: bool = True                    # false: no job runner program, /v1/jobs answers 404
    job_max_audio_seconds: float = 7200.0  # longest job audio (413 beyond); also sizes its upload limit
    job_max_queued: int = 16             # jobs waiting to start before POST /v1/jobs answers 503
    job_max_storage_mb: float = 2048.0   # audio of unfinished jobs on disk before 503 (16 kHz mono FLAC)
    job_retention_seconds: float = 86400.0  # finished jobs (result or error) are removed after this,
                                         # and a job still queued or running this long after it was submitted
    job_chunk_attempts: int = 3          # failed tries (5xx, timeout, instance died) before a chunk fails its job
    job_retry_seconds: float = 2.0       # wait before a failed chunk's next try, doubled each time (at most 60 s)
    job_runner_stall_seconds: float = 0.0  # runner heartbeat older than this: the watcher restarts it;
                                         # 0 = request_timeout_seconds + 60 (one chunk may take that long;
                                         # cutting a 2 h job at pauses took about 25 s on 2 busy cores)

    # nginx balancing.
    weights: str = ""                    # e.g. "2,1": per-instance upstream weight; "" = all 1
    max_fails: int = 3                   # nginx's passive health check: failed tries before an instance is skipped
    fail_timeout_seconds: int = 10       # ... within this many seconds, and skipped this long
    upstream_keepalive: int = 32         # idle keepalive connections from nginx to the instances
    nginx_user: str = ""                 # workers' user when nginx runs as root; "" = the run dir's owner

    # Edge security at nginx (the instances listen on loopback only).
    api_keys_file: str = ""              # one key per line; when set, requests need "Bearer <key>" (or API_KEY_SUBPROTOCOL)
    rate_limit_per_second: float = 0.0   # per client address; 0 = no limit
    rate_limit_burst: int = 20           # requests a client may send at once beyond the rate

    # Elastic pool: asrctl scale / autoscale (app/control/plan/policy.py documents each rule).
    autoscale: bool = False              # run `asrctl autoscale` as a supervisord program
    min_instances: int = 1               # fewest instances asrctl scale and the autoscaler leave
    max_instances: int = 4               # most instances asrctl scale and the autoscaler start
    target_in_flight: float = 2.0        # requests (running + waiting) per instance the pool aims for
    upscale_delay_seconds: float = 30.0  # load must stay high this long before the pool grows
    downscale_delay_seconds: float = 300.0 # load must stay low this long before it shrinks
    cooldown_seconds: float = 60.0       # no change this soon after the last one
    autoscale_interval_seconds: float = 10.0 # how often the autoscaler decides
    drain_timeout_seconds: float = 0.0   # 0 = request_timeout_seconds: the longest a request may take

    # Liveness on one host (asrctl watch, a supervisord program): like Kubernetes' livenessProbe.
    liveness: bool = True                # watch every instance's /health and restart a frozen one
    liveness_interval_seconds: float = 0.5 # how often the watcher probes each /health
    liveness_timeout_seconds: float = 1.0  # /health answers from a thread of its own, even mid-inference
    liveness_failures: int = 3           # missed probes in a row before the instance is restarted
    monitor_allow: str = ""              # addresses or CIDRs besides loopback that may read /metrics, /nginx_status

    # Per-instance values, set by supervisord in each program's environment.
    instance_id: str = ""                # the instance's name, asr-PORT
    instance_host: str = "127.0.0.1"     # loopback: nginx is the public entry (a pod binds 0.0.0.0)
    instance_port: int = 0               # the instance's own port
    cpu_cores: str = ""                  # e.g. "0-3" or "0,2"; "" = no pinning
    gpu_uuid: str = ""                   # the GPU placement chose (checked against CUDA's device 0)

    # Cache for converted models (the transformers engine's copy of the embedded model).
    model_cache: str = field(default_factory=lambda: str(Path.home() / ".cache" / "asr-service"))

    # -- Derived values: every timeout in the chain is sized from the longest allowed inference. --

    @property
    def max_upload_bytes(self) -> int:
        if self.max_upload_mb > 0:
            return int(self.max_upload_mb * 1024 * 1024)
        return int(self.max_audio_seconds * _WORST_CASE_BYTES_PER_SECOND) + 1024 * 1024

    @property
    def job_max_upload_bytes(self) -> int:
        """The /v1/jobs upload limit: ``job_max_audio_seconds`` of the same worst-case WAV as /asr's."""
        return max(self.max_upload_bytes, int(self.job_max_audio_seconds * _WORST_CASE_BYTES_PER_SECOND) + 1024 * 1024)

    @property
    def jobs_dir(self) -> Path:
        """The job database and the audio of unfinished jobs (mode 0700)."""
        return Path(self.run_dir).resolve() / "jobs"

    @property
    def peers_file(self) -> Path:
        """The instances nginx sends traffic to, written by asrctl on every change: where an instance
        finds its idle siblings and the job runner its instances."""
        return Path(self.run_dir).resolve() / "upstream.json"

    def chunk_slots(self, max_batch: int) -> int:
        """Queue slots one long request's chunks may hold in one instance at once: a whole batch on a
        GPU, but never more than half the queue, so other requests always find room (fairness)."""
        return max(1, min(max_batch, self.max_queue // 2))

    @property
    def max_inference_seconds(self) -> int:
        """The longest one request may take inside the engine, start-up of decoding included."""
        return math.ceil(self.max_audio_seconds * self.slowest_realtime_factor) + DECODE_START_SECONDS

    @property
    def request_timeout_seconds(self) -> int:
        """How long a request may wait in an instance: a full queue ahead of it, then its own run.

        Requests beyond ``max_queue`` are refused at once, so this bound is never reached by a healthy
        instance; it exists so a stuck one cannot hold nginx's connection forever.
        """
        return self.max_inference_seconds * 2

    @property
    def graceful_timeout_seconds(self) -> int:
        """gunicorn's graceful stop: long enough for the request in flight to finish."""
        return self.max_inference_seconds + 10

    @property
    def stop_wait_seconds(self) -> int:
        """supervisord's stopwaitsecs: longer than gunicorn's graceful stop, so it never SIGKILLs early."""
        return self.graceful_timeout_seconds + 10

    @property
    def runner_stall_seconds(self) -> float:
        """How long the job runner may go without a heartbeat: one chunk request may take up to
        ``request_timeout_seconds``, and it beats before and after each."""
        return self.job_runner_stall_seconds or self.request_timeout_seconds + 60

    @property
    def gunicorn_threads(self) -> int:
        """Threads to accept connections: the queue bound, one per open stream (a WebSocket holds its
        thread), plus room for probes and refusals."""
        return self.max_queue + self.max_streams + 4

    def batch_size(self, device: str) -> int:
        """Requests per engine call on ``device``: batching is what keeps a GPU busy; on CPU it gave
        2-7 % more audio per CPU second while every clip waits for the longest in its batch
        (docs/performance.md), so auto means no batching there."""
        if self.engine == "vllm":   # vLLM schedules whatever it is handed: hand it all that waits
            return min(self.max_batch or self.max_queue, self.max_queue)
        size = self.max_batch or (8 if device == "cuda" else 1)
        return min(size, self.max_queue)

    @property
    def drain_seconds(self) -> float:
        return self.drain_timeout_seconds or self.request_timeout_seconds

    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(self.instances)]

    def api_keys(self) -> list[str]:
        """Keys from ``api_keys_file`` (blank lines and # comments skipped); checked, since each goes
        into nginx's configuration."""
        if not self.api_keys_file:
            return []
        try:
            lines = Path(self.api_keys_file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"api_keys_file: {e}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        bad = [k for k in keys if not _API_KEY.fullmatch(k)]
        if bad or not keys:
            raise ConfigError("api_keys_file: each key must be 16-256 characters of A-Z a-z 0-9 . _ ~ + / = -")
        return keys

    def monitor_addresses(self) -> list[str]:
        """Who may read /metrics and /nginx_status through nginx: loopback, then ``monitor_allow``."""
        extra = [a.strip() for a in self.monitor_allow.split(",") if a.strip()]
        bad = [a for a in extra if not _ADDRESS.fullmatch(a)]
        if bad:
            raise ConfigError(f"monitor_allow: not an address or CIDR: {', '.join(bad)}")
        return ["127.0.0.1", "::1", *extra]

    def weight_list(self) -> list[int]:
        return _per_instance(self.weights, self.instances, default=1, name="weights")

    def gpu_list(self) -> list[int] | None:
        if not self.gpu_map:
            return None
        return _per_instance(self.gpu_map, self.instances, default=None, name="gpu_map")

    def to_toml(self) -> str:
        """The settings as a TOML file (only stored fields, not per-instance ones)."""
        lines = ["# Written by asrctl: the resolved settings every instance of this run directory reads."]
        for f in fields(self):
            if f.name in _PER_INSTANCE:
                continue
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


_ADDRESS = re.compile(r"[0-9A-Fa-f.:]+(/[0-9]{1,3})?")
_API_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")
# A browser cannot set headers on a WebSocket: it offers the key as this subprotocol plus the key, as
# OpenAI's Realtime API takes it (nginx's map and /auth read it where Authorization is absent).
API_KEY_SUBPROTOCOL = "openai-insecure-api-key."
_PER_INSTANCE = {"instance_id", "instance_host", "instance_port", "cpu_cores", "gpu_uuid"}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


def load_settings(
    config_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults < config file (argument or ``$ASR_CONFIG``) < ``ASR_*`` env < overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get(CONFIG_ENV)
    if path:
        values.update(_read_toml(Path(path)))
    types = {f.name: f.type for f in fields(Settings)}
    for name in types:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(values) - set(types)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    settings = Settings(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    from app.engines import ENGINES
    if s.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {s.engine!r}")
    if s.engine in ("qwen3-asr", "vllm") and s.model == "embedded":
        raise ConfigError(f"engine {s.engine} needs model = a Qwen3-ASR -hf directory or cached hub id "
                          "(e.g. Qwen/Qwen3-ASR-1.7B-hf downloaded ahead): the embedded model is Whisper")
    if s.aligner_model and s.engine not in ("qwen3-asr", "vllm"):
        raise ConfigError("aligner_model is for engines qwen3-asr and vllm; Whisper engines time words themselves")
    if s.engine == "vllm" and s.beam_size != 1:
        raise ConfigError("engine vllm decodes greedily, as Qwen3-ASR's own vLLM recipe does: set beam_size = 1")
    if s.gpus_per_instance < 1 or (s.gpus_per_instance > 1 and s.engine != "vllm"):
        raise ConfigError("gpus_per_instance must be at least 1, and above 1 only for engine vllm "
                          "(tensor parallelism); the other engines run on one GPU")
    if not 1 <= s.chunk_seconds <= 1200:
        raise ConfigError("chunk_seconds must be between 1 and 1200")
    if s.span_seconds and not s.chunk_seconds <= s.span_seconds <= 1200:
        raise ConfigError("span_seconds must be 0 (off) or between chunk_seconds and 1200")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {s.device!r}")
    if s.instances < 1:
        raise ConfigError("instances must be at least 1")
    if s.base_port <= s.port < s.base_port + max(s.instances, s.max_instances):
        raise ConfigError(f"port {s.port} (nginx) lies among the instances' ports {s.base_port}.."
                          f"{s.base_port + max(s.instances, s.max_instances) - 1}: choose another port or base_port")
    if not 1 <= s.beam_size <= 10:
        raise ConfigError("beam_size must be between 1 and 10")
    from app.formats import OUTPUTS
    if s.output not in OUTPUTS:
        raise ConfigError(f"output must be one of {', '.join(OUTPUTS)}, not {s.output!r}")
    from app.languages import to_code
    if not s.detect_language and to_code(s.language) is None:
        raise ConfigError("detect_language = false needs a language: the one every request gets")
    if not 1 <= s.min_instances <= s.max_instances:
        raise ConfigError("min_instances must be at least 1 and at most max_instances")
    if s.max_audio_seconds <= 0 or s.max_queue < 1:
        raise ConfigError("max_audio_seconds and max_queue must be positive")
    if s.job_max_audio_seconds <= 0 or s.job_max_queued < 1:
        raise ConfigError("job_max_audio_seconds and job_max_queued must be positive")
    if s.job_chunk_attempts < 1 or s.job_retry_seconds < 0 or s.job_runner_stall_seconds < 0:
        raise ConfigError("job_chunk_attempts must be at least 1, job_retry_seconds and "
                          "job_runner_stall_seconds not negative")
    if s.instance_gpu_memory_mb < 1 or s.gpu_headroom_mb < 0:
        raise ConfigError("instance_gpu_memory_mb must be at least 1 and gpu_headroom_mb not negative")
    if s.max_streams < 0 or s.stream_idle_seconds <= 0 or s.stream_max_seconds <= 0 or s.stream_redecode_seconds <= 0:
        raise ConfigError("max_streams must not be negative (0: no live streams); stream_idle_seconds, "
                          "stream_max_seconds and stream_redecode_seconds must be positive")
    if s.max_batch < 0 or s.max_wait_ms < 0:
        raise ConfigError("max_batch and max_wait_ms must not be negative (max_batch 0 = auto)")
    if any(w < 1 for w in s.weight_list()):
        raise ConfigError("weights must be at least 1")
    s.gpu_list()  # raises on a malformed map
    s.monitor_addresses()  # raises on a malformed address
    if s.liveness_interval_seconds <= 0 or s.liveness_timeout_seconds <= 0 or s.liveness_failures < 1:
        raise ConfigError("liveness_interval_seconds and liveness_timeout_seconds must be positive, "
                          "liveness_failures at least 1")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return data


def _coerce(name: str, value: Any, type_name: str) -> Any:
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name}: {value!r} is not a valid {type_name}") from None


def _per_instance(spec: str, n: int, default, name: str) -> list:
    if not spec:
        return [default] * n
    try:
        items = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, not {spec!r}") from None
    if any(x < 0 for x in items):
        raise ConfigError(f"{name} must not hold negative values")
    # Fewer entries than instances: the list repeats, so "1" means every instance gets 1.
    return [items[i % len(items)] for i in range(n)]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)
