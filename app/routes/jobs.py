"""``/v1/jobs``: submit a long recording, follow its progress, fetch its result, cancel it.

``POST /v1/jobs`` takes the same upload and parameters as ``/asr`` (the same checks, from
``app.routes.asr``), decodes the audio here (so a damaged file is refused at once, with /asr's errors) and
stores it with a queued job; the runner program does the rest. Any instance answers for any job: they
all read the one database in the run directory.

The upload is never held in memory: werkzeug spools it to an unnamed file under the run directory
(``UploadRequest``) and ``app.audio.decode.decode_to_flac`` decodes it from there block by block.

With API keys on, a job belongs to the key that created it: any other key gets 404 for it, as for
a job that does not exist, and ``GET /v1/jobs`` lists the caller's own jobs. Ids are secrets: logs
name a job by ``app.jobs.ref`` (the instance's request line, and nginx's access line through the
``X-ASR-Job`` header).
"""
from __future__ import annotations

import dataclasses
import hmac
import logging
import tempfile
import uuid
from datetime import datetime, timezone

from flask import Blueprint, Request, g, jsonify, request

from app.routes import asr
from app import formats, jobs
from app.audio.decode import decode_to_flac
from app.errors import ApiError, error_response, known_error_response
from app.jobs.store import DONE, FINISHED, Job, JobStore, StoreFull
from app.routes.openapi import Operation, register
from app.routes.params import Param, Params, check_names, choice

bp = Blueprint("jobs", __name__)
log = logging.getLogger("asr.jobs.api")

NO_PARAMS = Params(())
RESULT_PARAMS = Params((Param("output", "string", choices=formats.OUTPUTS, default="", description=(
    "json, txt, srt, vtt or tsv, as for /asr; not given: the output the job was posted with.")),))
_STATUS = {"application/json": {"type": "object", "properties": {
    "id": {"type": "string"}, "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
    "progress": {"type": "object", "properties": {"done_seconds": {"type": "number"},
                                                   "total_seconds": {"type": "number"}, "fraction": {"type": "number"}}},
    "result_url": {"type": "string"}, "error": {"type": "string", "nullable": True}}}}

register(
    Operation("post", "/v1/jobs", "Submit a long recording as an async job (answers 202)", "jobs",
              params=asr.ASR_PARAMS, upload="audio_file", raw_body=True, ok=_STATUS, ok_status="202",
              errors=("400", "413", "415", "422", "503"),
              description=("The same upload and parameters as /asr, up to job_max_audio_seconds. 202 with the "
                           "job's status and Location: /v1/jobs/{id}; 503 jobs_full when too many wait.")),
    Operation("get", "/v1/jobs", "The caller's jobs, newest first (needs API keys)", "jobs",
              params=NO_PARAMS, errors=("403",),
              ok={"application/json": {"type": "object", "properties": {
                  "jobs": {"type": "array", "items": _STATUS["application/json"]}}}},
              description="With API keys on, the jobs the calling key created; without keys, 403."),
    Operation("get", "/v1/jobs/{job_id}", "A job's state and progress, and its JSON result once done", "jobs",
              params=NO_PARAMS, ok=_STATUS, errors=("404",)),
    Operation("get", "/v1/jobs/{job_id}/result", "A finished job's transcript in any /asr output", "jobs",
              params=RESULT_PARAMS, errors=("404", "409"),
              ok={"application/json": {"$ref": "#/components/schemas/Transcript"},
                  **{formats.CONTENT_TYPES[o].split(";")[0]: {"type": "string"} for o in ("txt", "srt", "vtt", "tsv")}}),
    Operation("delete", "/v1/jobs/{job_id}", "Cancel a job (200), or remove a finished one (204)", "jobs",
              params=NO_PARAMS, ok=_STATUS, errors=("404",)),
)


@bp.errorhandler(Exception)
def _unexpected(e: Exception):
    """A failure of our own on a job route: logged by the job's ref, since Flask's own line would
    quote the path, id and all. (A blueprint's handler comes before the app's: ApiError and werkzeug's
    errors get app.errors' answers here.)"""
    known = known_error_response(e)
    if known is not None:
        return known
    log.error("unexpected error on %s (job %s)", request.url_rule.rule if request.url_rule else "a job route",
              g.get("job_ref"), exc_info=e)
    return error_response(500, "internal_error", "the server failed on this request")


@bp.after_request
def _name_the_job(response):
    """nginx logs a job's route with this short hash in place of the id (app/control/render/templates/nginx/nginx.conf.j2)."""
    if g.get("job_ref"):
        response.headers["X-ASR-Job"] = g.job_ref
    return response


def job_store() -> JobStore:
    from flask import current_app

    store = current_app.extensions.get("asr_job_store")
    if store is None:  # opened on first use: an app that never sees a job creates no files
        store = current_app.extensions["asr_job_store"] = jobs.store(asr.instance().settings)
    return store


UPLOAD_DIR = "asr.upload_dir"   # set in a request's environ: spool its files there


class UploadRequest(Request):
    """Flask's request, spooling a multipart file to an unnamed file in the folder the view names
    (``UPLOAD_DIR``), which disappears when the request ends: never the client's file name, and on
    the run directory's disk rather than in memory or a tmpfs /tmp."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        folder = self.environ.get(UPLOAD_DIR)
        if folder is None:
            return super()._get_file_stream(total_content_length, content_type, filename, content_length)
        return tempfile.TemporaryFile(dir=folder)


@bp.post("/v1/jobs")
def create():
    inst = asr.instance()
    settings = inst.settings
    with inst.track_request():
        owner = caller()
        request.max_content_length = settings.job_max_upload_bytes  # before the body is read
        request.environ[UPLOAD_DIR] = str(jobs.upload_dir(settings))
        params = asr.asr_params(inst)
        upload = _spooled(asr.upload_stream(), settings)
        asr.require_ready(inst)
        options = params.decode_options(inst)
        job_id = uuid.uuid4().hex
        g.job_ref = jobs.ref(job_id)
        path = jobs.audio_path(settings, job_id)
        audio = decode_to_flac(upload, path, settings.job_max_audio_seconds)
        g.audio_seconds = round(audio.duration, 3)
        stored = dataclasses.asdict(params) | {"language": options.language or ""}
        try:
            job = job_store().create(job_id, stored, round(audio.duration, 3), audio.bytes, settings.job_max_queued,
                                     int(settings.job_max_storage_mb * 1024 * 1024), owner or "")
        except StoreFull as e:
            path.unlink(missing_ok=True)
            raise asr.unavailable("jobs_full", f"cannot take a job now: {e}", inst) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        response = jsonify(status(job, settings.job_retention_seconds))
        response.status_code = 202
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return response


@bp.get("/v1/jobs")
def listing():
    NO_PARAMS.parse(asr.instance().settings)
    owner = caller()
    if owner is None:
        raise ApiError(403, "listing_needs_api_keys", "jobs are listed per API key, and this server has none "
                       "(api_keys_file): a job is reached by its id")
    retention = asr.instance().settings.job_retention_seconds
    return jsonify(jobs=[status(job, retention, with_result=False) for job in job_store().jobs(owner)])


@bp.get("/v1/jobs/<job_id>")
def show(job_id: str):
    NO_PARAMS.parse(asr.instance().settings)
    return jsonify(status(_job(job_id), asr.instance().settings.job_retention_seconds))


@bp.get("/v1/jobs/<job_id>/result")
def result(job_id: str):
    check_names(RESULT_PARAMS.names, {})  # the default output is the job's own, so parsed here
    job = _job(job_id)
    output = choice("output", formats.OUTPUTS, job.params.get("output", "json"))
    if job.state != DONE:
        if job.state in FINISHED:
            raise ApiError(409, f"job_{job.state}", f"job {job.id} is {job.state}" + (f": {job.error}" if job.error else ""))
        raise ApiError(409, "job_not_finished", f"job {job.id} is {job.state}: "
                       f"{job.done_seconds:.0f} of {job.duration:.0f} s done",
                       {"Retry-After": str(asr.instance().settings.retry_after_seconds)})
    return formats.render(formats.from_dict(job.result), output, {"job_id": job.id},
                          words=bool(job.params.get("word_timestamps")))


@bp.delete("/v1/jobs/<job_id>")
def cancel(job_id: str):
    """Cancel a job that has not finished (200, its state); remove a finished one (204)."""
    NO_PARAMS.parse(asr.instance().settings)
    job = _job(job_id)
    store, settings = job_store(), asr.instance().settings
    if job.state in FINISHED:
        store.delete(job.id)
        jobs.remove_audio(settings, job.id)
        return "", 204
    job = store.cancel(job.id)
    jobs.remove_audio(settings, job.id)
    return jsonify(status(job, settings.job_retention_seconds))


def status(job: Job, retention_seconds: float, with_result: bool = True) -> dict:
    body = {
        "id": job.id,
        "state": job.state,
        "progress": {"done_seconds": round(min(job.done_seconds, job.duration), 3),
                     "total_seconds": job.duration,
                     "fraction": round(min(1.0, job.done_seconds / job.duration), 4) if job.duration else 1.0},
        "created_at": _iso(job.created),
        "started_at": _iso(job.started),
        "finished_at": _iso(job.finished),
        "expires_at": _iso(job.finished + retention_seconds) if job.finished else None,
        "error": job.error,
        "result_url": f"/v1/jobs/{job.id}/result",
    }
    if job.state == DONE and with_result:
        body["result"] = job.result
    return body


def _job(job_id: str) -> Job:
    """The job, if the caller may see it: another key's job is answered exactly as a missing one."""
    g.job_ref = jobs.ref(job_id)
    owner = caller()
    job = job_store().get(job_id) if jobs.valid_id(job_id) else None
    if job is None or (owner is not None and not hmac.compare_digest(job.owner, owner)):
        raise ApiError(404, "job_not_found", "no such job (finished jobs are removed after job_retention_seconds)")
    return job


def caller() -> str | None:
    """The hash of the caller's API key (``jobs.owner_hash``), or None where no keys are configured.

    nginx has checked the key already; an instance checks it again, since its loopback port can be
    reached without nginx: no valid key, 401.
    """
    from flask import current_app

    keys = current_app.extensions.get("asr_job_keys")
    if keys is None:
        keys = current_app.extensions["asr_job_keys"] = tuple(asr.instance().settings.api_keys())
    if not keys:
        return None
    given = request.headers.get("Authorization", "")
    key = given[len("Bearer "):] if given.startswith("Bearer ") else ""
    # Compared with every key, each in constant time, as app.routes.auth does.
    if not any([hmac.compare_digest(key.encode(), k.encode()) for k in keys]):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <api key>",
                       {"WWW-Authenticate": 'Bearer realm="asr"'})
    return jobs.owner_hash(key)


def _spooled(stream, settings):
    """The upload as a seekable file on disk: a multipart file already is (``UploadRequest``); a raw
    body is copied there in blocks."""
    if stream.seekable() if hasattr(stream, "seekable") else False:
        return stream
    spool = tempfile.TemporaryFile(dir=jobs.upload_dir(settings))
    while block := stream.read(1024 * 1024):
        spool.write(block)
    spool.seek(0)
    return spool


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


