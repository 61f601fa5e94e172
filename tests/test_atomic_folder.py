"""fewstep.atomic_folder: folders appear whole or not at all; work folders of killed writers
(real subprocesses, SIGKILLed) are removed by the next write, live writers' never; writes that
could change their own source are refused (`lora apply --out` inside the package)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fewstep.atomic_folder import (
    CONTENT_NAME,
    LOCK_NAME,
    atomic_folder,
    check_separate,
    remove_stale_work_folders,
)

# Enters the block, writes a file, says so, then lives until a line arrives on stdin.
WRITER = """
import sys
from fewstep.atomic_folder import atomic_folder

with atomic_folder(sys.argv[1]) as folder:
    (folder / "partial.bin").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    sys.stdin.readline()
    (folder / "done.txt").write_text("the subprocess")
"""


def _work_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


class Writer:
    """A writer in another process, stopped inside its `with atomic_folder(out)` block."""

    def __init__(self, out: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline() == "writing\n"

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)


@pytest.fixture
def writers():
    started: list[Writer] = []

    def start(out: Path) -> Writer:
        started.append(Writer(out))
        return started[-1]

    yield start
    for writer in started:
        if writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait()


def test_folder_appears_whole_and_alone(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic_folder(out) as folder:
        assert folder.name == CONTENT_NAME and folder.parent.parent == out.parent
        (folder / "a.txt").write_text("a")
        (folder / "sub").mkdir()
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "sub"]  # no lock file in it
    assert _work_folders(out) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # like any new folder, not mkdtemp's


def test_failure_leaves_nothing_and_empty_out_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as folder:
        (folder / "a.txt").write_text("a")
        raise KeyboardInterrupt
    assert list(out.iterdir()) == [] and _work_folders(out) == []
    with atomic_folder(out) as folder:  # the empty folder is a fine destination
        (folder / "b.txt").write_text("b")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    with pytest.raises(OSError), atomic_folder(out) as folder:  # a non-empty one is not
        (folder / "c.txt").write_text("c")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and _work_folders(out) == []


def test_killed_writer_is_cleaned_up_by_the_next_write(tmp_path, writers):
    out = tmp_path / "out"
    writers(out).kill()
    (left,) = _work_folders(out)
    assert (left / CONTENT_NAME / "partial.bin").is_file() and not out.exists()
    with atomic_folder(out) as folder:
        assert _work_folders(out) == [folder.parent]  # the dead writer's folder is gone
        (folder / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert _work_folders(out) == []


def test_live_writer_keeps_its_folder_and_finishes(tmp_path, writers):
    out = tmp_path / "out"
    writer = writers(out)
    (live,) = _work_folders(out)
    assert remove_stale_work_folders(out) == []
    # A second writer to the same destination: its cleanup keeps the live one's folder.
    with pytest.raises(RuntimeError, match="abandoned"), atomic_folder(out) as folder:
        assert _work_folders(out) == sorted([live, folder.parent])
        raise RuntimeError("abandoned")
    assert (live / CONTENT_NAME / "partial.bin").is_file()
    assert writer.finish() == 0
    assert sorted(p.name for p in out.iterdir()) == ["done.txt", "partial.bin"]
    assert _work_folders(out) == []


def test_only_work_folders_of_this_destination_are_removed(tmp_path, writers):
    out = tmp_path / "out"
    lookalike = tmp_path / ".out.tmp-abcd1234"  # no lock file: not known to be a work folder
    (lookalike / "data").mkdir(parents=True)
    other = tmp_path / "out.tmp-x"  # another destination whose name starts like ours
    writers(other).kill()
    linked = tmp_path / ".out.tmp-link0000"  # a link to a dead writer's folder
    linked.symlink_to(_work_folders(other)[0], target_is_directory=True)
    assert remove_stale_work_folders(out) == []
    assert (lookalike / "data").is_dir() and len(_work_folders(other)) == 1
    (stale,) = _work_folders(other)
    assert remove_stale_work_folders(other) == [stale] and not stale.exists()


# ---------------------------------------------------------------------------------------------
# Writes that would change their source
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, match",
    [
        ("pkg", "out must be a new folder, not the package itself"),
        ("pkg/sub/new", "out must be outside the package"),
        ("link/new", "out must be outside the package"),  # through a symlink to it
        (".", "out must not contain the package"),
    ],
)
def test_out_overlapping_the_source_is_refused(tmp_path, where, match):
    (tmp_path / "pkg" / "unet").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "pkg", target_is_directory=True)
    with pytest.raises(ValueError, match=match) as raised:
        check_separate(tmp_path / where, tmp_path / "pkg")
    assert f"out={str(tmp_path / where)!r}" in str(raised.value)
    check_separate(tmp_path / "pkg2", tmp_path / "pkg")  # a sibling is fine
    check_separate(tmp_path / "pkg" / "unet" / ".." / ".." / "pkg2", tmp_path / "pkg")


def _lora_file(package: Path, folder: Path) -> Path:
    """A one-layer kohya LoRA on the package's first 2-D U-Net weight."""
    from safetensors.numpy import save_file

    from fewstep.lora.onnx_package import package_graph_weights

    name, shape = next((n, s) for n, s in package_graph_weights(package)["unet"].shapes().items()
                       if len(s) == 2)  # fmt: skip
    rng = np.random.default_rng(0)
    module = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
    path = folder / "lora.safetensors"
    save_file(
        {
            f"{module}.lora_down.weight": rng.standard_normal((1, shape[1])).astype(np.float32),
            f"{module}.lora_up.weight": rng.standard_normal((shape[0], 1)).astype(np.float32),
        },
        str(path),
    )
    return path


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden ones too) with its bytes (None for a folder)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in root.rglob("*")
    }


def test_lora_apply_inside_the_package_is_refused_and_writes_nothing(tiny_package, tmp_path):
    import shutil

    from fewstep.lora import apply_loras_to_package

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package("sd1"), pkg)
    lora = _lora_file(pkg, tmp_path)
    before = _tree(pkg)
    for out in (pkg / "loras" / "new", pkg / "unet" / "new", pkg):
        with pytest.raises(ValueError, match=r"^out must .*package.*: got out="):
            apply_loras_to_package(pkg, [(lora, 1.0)], out)
        assert _tree(pkg) == before, out


def test_lora_apply_removes_a_killed_apply_and_writes(tiny_package, tmp_path):
    from fewstep.lora import apply_loras_to_package
    from fewstep.package import verify_package

    pkg = tiny_package("sd1")
    out = tmp_path / "with-lora"
    stale = tmp_path / ".with-lora.tmp-dead0000"  # what a killed writer leaves: lock free
    (stale / CONTENT_NAME / "unet").mkdir(parents=True)
    (stale / LOCK_NAME).touch()
    apply_loras_to_package(pkg, [(_lora_file(pkg, tmp_path), 0.5)], out)
    assert not stale.exists() and _work_folders(out) == []
    assert verify_package(out)["loras"][-1]["scale"] == 0.5


def test_combined_folder_inside_either_input_is_refused(tiny_model, tiny_package, tmp_path):
    import shutil

    from fewstep.export.shared_weights import combine_with_diffusers_folder

    folder = tmp_path / "diffusers"
    shutil.copytree(tiny_model("sd1"), folder)
    before = _tree(folder)
    pkg = tiny_package("sd1")
    with pytest.raises(ValueError, match="out must be outside the diffusers_folder"):
        combine_with_diffusers_folder(pkg, folder, folder / "combined")
    with pytest.raises(ValueError, match="out must be outside the package"):
        combine_with_diffusers_folder(pkg, folder, pkg / "combined")
    assert _tree(folder) == before and not (pkg / "combined").exists()
