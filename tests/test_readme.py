"""README.md's commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmds = [c for c in readme_commands() if "pytest" in c]
    assert len(test_cmds) == 1, test_cmds
    assert test_cmds[0].strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_pins_torch_and_builds_without_isolation():
    for cmd in readme_commands():
        if "pip install" in cmd and cmd.startswith(("python3 -m venv", "{ apt-get")):
            assert "torch==2.13.0" in cmd and "--no-build-isolation" in cmd, cmd
