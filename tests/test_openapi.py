"""/openapi.json is what the routes validate with: one source for checks and documentation.

The bad values are derived from the document alone (its enums, bounds and lengths), and the
accepted names from the routes' own refusals; an app with the real model answers them in process.
"""
import io

import pytest
from openapi_spec_validator import validate

from app.routes import create_app, openapi
from app.config import load_settings
from support import spoken_wav



@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = load_settings(None, overrides={"run_dir": str(tmp_path_factory.mktemp("openapi"))})
    app = create_app(settings, load_in_background=False)
    yield app
    app.extensions["asr_instance"].queue.stop()  # no inference thread left when the interpreter exits


@pytest.fixture(scope="module")
def doc(app):
    return app.test_client().get("/openapi.json").get_json()


def operations(doc):
    """(path, method, {name: schema}, where the parameters go) for every operation taking an upload."""
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if "requestBody" not in op:
                continue
            form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
            upload = next(n for n, s in form["properties"].items() if s.get("format") == "binary")
            query = {p["name"]: p["schema"] for p in op.get("parameters", [])}
            fields = {n: s for n, s in form["properties"].items() if n != upload}
            yield path, method, upload, (query, "query") if query else (fields, "form")


def post(app, path, upload, params, where):
    files = {upload: (io.BytesIO(spoken_wav()), "speech.wav")}
    client = app.test_client()
    if where == "query":
        return client.post(path, query_string=params, data=files)
    return client.post(path, data={**params, **files})


def bad_value(name, schema):
    """A value the schema itself says is wrong, or None where it allows any string."""
    if schema["type"] == "array":
        return "bogus"
    if "enum" in schema:
        return "bogus"
    if schema["type"] in ("integer", "number"):
        return str(schema["maximum"] + 1)
    if schema["type"] == "boolean":
        return "maybe"
    if "maxLength" in schema:
        return "x" * (schema["maxLength"] + 1)
    if name == "language":  # "a language the model knows": this one knows English only
        return "xx-nope"
    return None


def error_param(response):
    error = response.get_json()["error"]
    return error.get("param") or error["message"].split(":")[0]


def test_document_is_valid_openapi_3(doc):
    validate(doc)
    assert doc["openapi"].startswith("3.")
    assert {"/asr", "/detect-language", "/v1/audio/transcriptions", "/v1/audio/translations"} <= set(doc["paths"])


def test_every_documented_parameter_is_validated(app, doc):
    checked = []
    for path, _method, upload, (params, where) in operations(doc):
        for name, schema in params.items():
            value = bad_value(name, schema)
            response = post(app, path, upload, {name: value if value is not None else "any-name-at-all"}, where)
            if value is None:  # free text: documented as taking any value, and it does
                if path == "/v1/audio/translations":  # refused for the English-only model, as documented
                    assert "English only" in response.get_json()["error"]["message"]
                else:
                    assert response.status_code == 200, (path, name, response.get_json())
                continue
            assert response.status_code == 422, (path, name, value, response.get_json())
            assert response.get_json()["error"]["code"] == "invalid_parameter"
            assert error_param(response) == name, (path, name, response.get_json())
            checked.append((path, name))
    assert len(checked) >= 12, checked


def test_every_accepted_parameter_is_documented(app, doc):
    for path, _method, upload, (params, where) in operations(doc):
        response = post(app, path, upload, {"surely_not_a_parameter": "1"}, where)
        assert response.status_code == 422
        message = response.get_json()["error"]["message"]
        accepted = message.split("(accepted: ")[1].rstrip(")").split(", ")
        assert sorted(accepted) == sorted(params), (path, accepted, list(params))


def test_documented_defaults_are_accepted_together(app, doc):
    for path, _method, upload, (params, where) in operations(doc):
        if path == "/v1/audio/translations":  # the embedded model is English-only: refused, as documented
            continue
        values = {n: str(s["default"]).lower() if isinstance(s["default"], bool) else s["default"]
                  for n, s in params.items() if "default" in s}
        response = post(app, path, upload, values, where)
        documented = min(code for code in doc["paths"][path]["post"]["responses"] if code.startswith("2"))
        assert response.status_code == int(documented), (path, values, response.get_json())


def test_defaults_come_from_the_settings(app, tmp_path):  # app: the routes are registered
    settings = load_settings(None, overrides={"run_dir": str(tmp_path), "output": "srt", "beam_size": 3,
                                              "vad_filter": True})
    doc = openapi.document(settings, "test")
    params = {p["name"]: p["schema"] for p in doc["paths"]["/asr"]["post"]["parameters"]}
    assert params["output"]["default"] == "srt" and params["beam_size"]["default"] == 3
    assert params["vad_filter"]["default"] is True and "security" not in doc


def test_api_keys_show_in_the_document(app, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k" * 32 + "\n")
    settings = load_settings(None, overrides={"run_dir": str(tmp_path), "api_keys_file": str(keys)})
    doc = openapi.document(settings, "test")
    assert doc["components"]["securitySchemes"]["apiKey"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/health"]["get"]["security"] == []  # probes stay public at nginx
    assert "k" * 32 not in str(doc)


def test_a_route_module_adds_operations_with_path_parameters(app):
    from app.config import Settings
    from app.routes.openapi import Operation

    op = Operation("get", "/v1/jobs/{job_id}", "A job", "jobs", errors=("503",)).document(Settings())
    assert op["operationId"] == "get_v1_jobs_job_id"
    assert op["parameters"] == [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    validate({"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {"/v1/jobs/{job_id}": {"get": op}},
              "components": {"schemas": openapi.SCHEMAS}})
