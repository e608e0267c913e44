"""Outputs written whole or not at all: folders, and files."""

import os

import pytest

from lit_mistral.io import write_text, writing_folder


def test_output_folders_are_written_whole_and_a_cache_entry_built_meanwhile_wins(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), writing_folder(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed midway")
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no leftovers
    with writing_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with writing_folder(target) as tmp:  # an output folder: the new one replaces the old
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second"
    with writing_folder(target, keep_existing=True) as tmp:  # a cache entry: the one already there stays
        (tmp / "a.txt").write_text("third")
    assert (target / "a.txt").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_get_the_mode_the_umask_gives_even_files_written_private(tmp_path):
    """safetensors writes its files 0600; an adapter or export folder is published with every file readable as the
    umask allows, like any other output (a team reads the adapter a run wrote)."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o027)
    try:
        with writing_folder(tmp_path / "adapter") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "config.json").write_text("{}")
        write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"adapter": 0o750, "adapter_model.safetensors": 0o640, "sub": 0o750, "config.json": 0o640,
                     "report.md": 0o640}


def test_a_file_is_written_whole_or_left_as_it_was(tmp_path):
    path = tmp_path / "report.md"
    write_text(path, "first")
    with pytest.raises(RuntimeError), open(path) as before:
        from lit_mistral.io import writing_file

        with writing_file(path) as f:
            f.write("half of the sec")
            raise RuntimeError("killed midway")
    assert before.closed and path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    write_text(path, "second")
    assert path.read_text() == "second"


def test_output_paths_are_checked_for_kind_and_a_folder_that_takes_files(tmp_path):
    from lit_mistral.errors import LitMistralError
    from lit_mistral.io import check_output_file, check_output_folder, unwritable

    assert unwritable(tmp_path) is None and list(tmp_path.iterdir()) == []  # the probe leaves nothing
    assert unwritable("/sys") == "Permission denied"  # read-only for root too: permission bits would not tell
    (tmp_path / "file").write_text("x")
    assert check_output_file(tmp_path / "new.jsonl", "k", "a.jsonl") == tmp_path / "new.jsonl"
    assert check_output_folder(tmp_path / "new" / "deeper", "k") == tmp_path / "new" / "deeper"
    for check, path, message in [
        (check_output_file, tmp_path, r"k: '.*' is a folder. Fix: give the path of a file, e.g. '.*/a.jsonl'"),
        (check_output_file, tmp_path / "missing" / "a.jsonl", r"the folder '.*missing' does not exist"),
        (check_output_file, tmp_path / "file" / "a.jsonl", r"the folder '.*file' is a file, not a folder"),
        (check_output_file, "/sys/a.jsonl", r"the folder '/sys' is not writable \(Permission denied\)"),
        (check_output_folder, tmp_path / "file" / "runs", r"'.*file/runs' cannot be a folder \(its parent"),
        (check_output_folder, "/sys/runs", r"'/sys' is not writable \(Permission denied\)"),
    ]:
        with pytest.raises(LitMistralError, match=message):
            check(path, "k", "a.jsonl") if check is check_output_file else check(path, "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created on the way


def test_numbered_folders_are_claimed_once_each_by_processes_racing_for_them(tmp_path):
    import threading

    from lit_mistral.io import claim_numbered_folder

    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_x").mkdir()  # not a number: not counted
    start, claimed = threading.Barrier(8), []

    def claim():
        start.wait()  # all list the folder at once: all see version_3 as the highest
        claimed.append(claim_numbered_folder(tmp_path, "version_"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(4, 12))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["version_3", "version_x"] +
                                                                [f"version_{n}" for n in range(4, 12)])
