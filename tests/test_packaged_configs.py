"""The configs/ templates and scenarios ship inside the package, found through importlib.resources."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
from pathlib import Path

from ledger.config import find_template, load_template, packaged_config
from node.scenarios import SCENARIO_DIRECTORY


def test_the_demo_template_is_found_through_importlib_resources() -> None:
    """Regression: demo found configs/local-4.toml beside the source tree, absent from a wheel install."""
    resource = importlib.resources.files("ledger.configs").joinpath("local-4.toml")
    assert resource.is_file()
    assert packaged_config("local-4.toml") == resource
    assert len(load_template(packaged_config("local-4.toml")).addresses) == 4
    assert len(load_template(packaged_config("local-7.toml")).addresses) == 7


def test_scenarios_are_found_through_importlib_resources() -> None:
    assert SCENARIO_DIRECTORY == importlib.resources.files("ledger.configs").joinpath("scenarios")
    assert any(SCENARIO_DIRECTORY.glob("*.toml"))


def test_a_template_path_that_exists_wins_over_the_packaged_one(tmp_path: Path) -> None:
    mine = tmp_path / "configs" / "local-4.toml"
    mine.parent.mkdir()
    mine.write_text("")
    assert find_template(mine) == mine
    assert find_template(Path("configs/nothing-like-it.toml")) == Path("configs/nothing-like-it.toml")
    assert find_template(Path("elsewhere/local-4.toml")) == Path("elsewhere/local-4.toml")


def test_init_configs_local_4_works_from_a_directory_without_configs(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "node.cli", "init", "configs/local-4.toml", "--out", "net", "--base-port", "17900"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "using the packaged template" in completed.stdout
    assert sorted(path.name for path in (tmp_path / "net").glob("replica-*.toml")) == [f"replica-{index}.toml" for index in range(4)]
