"""Settings: one source (defaults < file < env < overrides) and timeouts that nest correctly."""
import re

import pytest

from app.config import ConfigError, Settings, load_settings


def test_precedence_file_then_env_then_overrides(tmp_path):
    config = tmp_path / "asr.toml"
    config.write_text('engine = "transformers"\ninstances = 3\nport = 8000\nbeam_size = 2\n')
    env = {"ASR_CONFIG": str(config), "ASR_INSTANCES": "4", "ASR_PORT": "8100"}
    s = load_settings(env=env, overrides={"port": 8200, "model": None})
    assert s.engine == "transformers"      # from the file
    assert s.beam_size == 2                 # from the file
    assert s.instances == 4                 # env beats file
    assert s.port == 8200                   # override beats env
    assert s.model == "embedded"            # None override leaves the default


def test_written_settings_read_back_identically(tmp_path):
    s = load_settings(env={}, overrides={"engine": "transformers", "max_audio_seconds": 120.5, "weights": "2,1",
                                         "run_dir": str(tmp_path / 'run "quoted"')})
    path = tmp_path / "asr.toml"
    path.write_text(s.to_toml())
    again = load_settings(path, env={})
    assert again == s


MODEL_KEYS = ("engine", "model", "device", "compute_type", "beam_size", "max_batch", "language", "detect_language",
              "output", "word_timestamps", "vad_filter")


@pytest.mark.parametrize("path", ["deploy/asr.toml", "deploy/k8s/overlays/cpu/asr.toml",
                                  "deploy/k8s/overlays/gpu/asr.toml"])
def test_shipped_model_configurations_load_and_spell_out_the_model_keys(path):
    import tomllib

    from support import REPO

    with (REPO / path).open("rb") as f:
        written = tomllib.load(f)
    assert set(MODEL_KEYS) <= set(written), set(MODEL_KEYS) - set(written)
    settings = load_settings(REPO / path, env={})
    assert {k: getattr(settings, k) for k in written} == written


def test_timeouts_nest_from_the_longest_inference():
    s = Settings(max_audio_seconds=600, slowest_realtime_factor=0.5)
    assert s.max_inference_seconds >= 300
    assert s.stop_wait_seconds > s.graceful_timeout_seconds > s.max_inference_seconds
    assert s.request_timeout_seconds >= s.max_inference_seconds
    # The upload limit follows the audio limit unless set explicitly.
    assert s.max_upload_bytes > 600 * 48_000 * 2 * 2
    assert Settings(max_upload_mb=1).max_upload_bytes == 1024 * 1024


@pytest.mark.parametrize("overrides, words", [
    ({"engine": "onnx"}, "engine"),
    ({"device": "tpu"}, "device"),
    ({"instances": 0}, "instances"),
    ({"beam_size": 50}, "beam_size"),
    ({"weights": "2,x"}, "weights"),
    ({"weights": "0"}, "weights"),
    ({"instances": "many"}, "instances"),
    ({"colour": "blue"}, "colour"),
    ({"output": "pdf"}, "output"),
    ({"detect_language": False}, "detect_language"),
    ({"word_timestamps": "sometimes"}, "word_timestamps"),
    ({"span_seconds": 20}, "span_seconds"),            # shorter than chunk_seconds (30)
    ({"span_seconds": 5000}, "span_seconds"),
])
def test_bad_settings_are_refused_by_name(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_settings(env={}, overrides=overrides)


def test_per_instance_lists_repeat_to_the_instance_count():
    s = Settings(instances=4, weights="2,1", gpu_map="1")
    assert s.weight_list() == [2, 1, 2, 1]
    assert s.gpu_list() == [1, 1, 1, 1]
    assert s.ports() == [s.base_port + i for i in range(4)]


def test_instances_default_to_ports_next_to_nginx_not_9000():
    """9000 is php-fpm's and MinIO's default: instances listen on 7861 and up, nginx on 7860."""
    s = Settings()
    assert (s.port, s.ports()) == (7860, [7861, 7862])


@pytest.mark.parametrize("overrides, message", [
    ({"engine": "qwen3-asr"}, "needs model = a Qwen3-ASR -hf directory"),
    ({"aligner_model": "/srv/aligner"}, "aligner_model is for engines qwen3-asr and vllm"),
    ({"engine": "vllm"}, "engine vllm needs model = a Qwen3-ASR -hf directory"),
    ({"engine": "vllm", "model": "/srv/qwen"}, "engine vllm decodes greedily"),
    ({"gpus_per_instance": 2}, "above 1 only for engine vllm"),
    ({"chunk_seconds": 0}, "chunk_seconds"),
    ({"detect_language": False, "language": "auto"}, "detect_language = false needs a language"),
    ({"engine": "whisper.cpp"}, "engine must be one of ctranslate2, transformers, qwen3-asr"),
    # nginx's port where a scaled-up instance would listen
    ({"port": 7863, "max_instances": 4}, "port 7863 (nginx) lies among the instances' ports 7861..7864"),
])
def test_settings_that_cannot_serve_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(env={}, overrides=overrides)
