"""Session 36 user trial of the CLI: a write the system refuses ends in one line, not a traceback; the target
column's messages offer the target's fix; an infinite ``--lr`` is refused as not finite."""

from __future__ import annotations

import os

import pytest

from bma_gp.cli import main
from bma_gp.datasets import DatasetError, load_csv
from cli_subprocess import small_cli_run


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (a device that is always full)")
def test_standard_output_on_a_full_device_ends_in_one_line(tmp_path):
    import subprocess

    command, env = small_cli_run(tmp_path)
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            command,
            stdout=full,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines() == ["bma-gp: error: No space left on device; nothing more was written."], err
    assert not (tmp_path / "out").exists()  # the directory the run created, removed as after any failure


@pytest.mark.parametrize(
    ("cells", "what"),
    [(["a", "b", "c"], "is not numeric"), (["1", "inf", "2"], "is not finite"), (['"1,5"', "2", "3"], "decimal comma")],
)
def test_target_column_messages_offer_the_targets_fix(tmp_path, cells, what):
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells)), encoding="utf-8")
    with pytest.raises(DatasetError, match=what) as info:
        load_csv(str(path), target="y")
    assert "choose another target column" in str(info.value)
    assert "features" not in str(info.value).split(what, 1)[1]
    path.write_text("y,x\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells)), encoding="utf-8")
    with pytest.raises(DatasetError, match="leave this column out of the features"):
        load_csv(str(path), target="y")


@pytest.mark.parametrize("option", ["--lr", "--period"])
def test_infinite_positive_option_is_refused_as_not_finite(option, capsys):
    with pytest.raises(SystemExit) as info:
        main([option, "inf"])
    assert info.value.code == 2
    assert f"argument {option}: expected a finite positive number, got inf" in capsys.readouterr().err
