import re

from conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(quickstart)
    assert len(blocks) == 2, "the quickstart has exactly two commands"
    test_command = blocks[1]
    assert "pytest" in test_command and test_command.startswith("pip install torch==2.13.0")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_main_command_installs_cpu_torch_first():
    readme = (REPO / "README.md").read_text()
    main = _bash_blocks(readme.split("## Quickstart", 1)[1])[0]
    assert main.startswith("pip install torch==2.13.0 && pip install -e .")
    assert "train_dp_ldm.py" in main
