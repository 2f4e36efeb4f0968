"""The prediction-run protocol (``spade_ad.runs``): unique and stable output names, the model generation a run
pins, run.json listing only this run's files, broken links reported, the append-only predictions.jsonl writer,
and help texts whose square brackets survive Rich markup. (The Ray path's share: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from spade_ad import Spade, runs

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=3)


@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runs") / "model"
    Spade(**FAST).fit(small_train / "train" / "good").save(d)
    return d


def colliding_inputs(small_train: Path, root: Path) -> list[str]:
    """The issue's folder (``a.png`` good, ``a.jpg`` and ``a_1.png`` defective), a second folder of the same name,
    and one file given twice: every input a different image except the repeated one."""
    test = small_train / "test"
    coll = root / "x" / "coll"
    coll.mkdir(parents=True)
    shutil.copy(test / "good" / "000.png", coll / "a.png")
    shutil.copy(test / "scratch" / "000.png", coll / "a.jpg")  # (a PNG named .jpg: the decoder reads it anyway)
    shutil.copy(test / "scratch" / "001.png", coll / "a_1.png")
    other = root / "y" / "coll"
    other.mkdir(parents=True)
    shutil.copy(test / "blob" / "000.png", other / "a.png")
    return [str(coll), str(other), str(test / "blob" / "001.png"), str(test / "blob" / "001.png")]


# ------------------------------------------------------------------ output names
def test_unique_stems_cover_every_kind_of_collision() -> None:
    named = [("coll_a", ".png"), ("coll_a", ".jpg"), ("coll_a_1", ".png"),  # the folder
             ("good_000", ".png"), ("good_000", ".png"),  # the same file name in two folders called good
             ("b", ".png"), ("b", ".png"),  # one file given twice
             ("C", ".png"), ("c", ".bmp"),  # names one case-insensitive file system would merge
             ("coll_a.png", ".png"),  # a natural stem equal to a name with its extension kept
             ("plain", ".png")]
    stems = runs.unique_stems(named)
    assert stems == ["coll_a.png~1", "coll_a.jpg", "coll_a_1", "good_000.png~1", "good_000.png~2", "b.png~1",
                     "b.png~2", "C.png", "c.bmp", "coll_a.png", "plain"]
    assert len({s.casefold() for s in stems}) == len(stems)
    assert runs.unique_stems(named) == stems  # a function of the list: the same names in every run


def test_predict_gives_every_input_its_own_files(model_dir: Path, small_train: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    inputs = colliding_inputs(small_train, tmp_path)
    out = tmp_path / "O"
    code, _, err = run_cli(["predict", str(model_dir), *inputs, "--out", str(out)], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    names = [r[k] for r in rows for k in ("overlay", "map", "mask")]
    assert len(set(names)) == len(names) == 18  # 3 files per input, none shared
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["outputs"]) == sorted(names) == sorted(p.name for p in out.iterdir()
                                                            if p.name not in ("run.json", "predictions.jsonl"))
    model = Spade.load(model_dir)
    for r in rows:  # each row's map is its own image's map
        assert np.array_equal(np.load(out / r["map"]), model.predict([r["file"]])[0].map), r["file"]
    assert [r["overlay"] for r in rows] == [  # (x/coll: a.jpg, a.png, a_1.png; y/coll: a.png; blob/001.png twice)
        "coll_a.jpg_overlay.png", "coll_a.png~1_overlay.png", "coll_a_1_overlay.png", "coll_a.png~2_overlay.png",
        "001.png~1_overlay.png", "001.png~2_overlay.png"]
    # the same inputs again: the same names (a rerun into OUT needs no --overwrite)
    code, _, err = run_cli(["predict", str(model_dir), *inputs, "--out", str(out)], capsys)
    assert code == 0, err
    again = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["map"] for r in again] == [r["map"] for r in rows]


# ------------------------------------------------------------------ the model generation of a run
def _update(model_dir: Path, image: Path, times: int = 1) -> None:
    """``times`` new generations: ``image`` added, then removed, and so on (an image is in a model once)."""
    for _ in range(times):
        model = Spade.load(model_dir)
        if "extra.png" in model.train_names_:
            model.remove(["extra.png"])
        else:
            model.add([str(image)], names=["extra.png"])
        model.save(model_dir)


def test_a_run_scores_with_the_generation_it_pinned(model_dir: Path, small_train: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = tmp_path / "before"  # the generation the run starts with, kept aside to compare
    shutil.copytree(model_dir, before)
    real_pin = runs.pin_model
    extra = small_train / "test" / "good" / "001.png"

    def pin_then_update(d: str | Path) -> runs.ModelPin:
        pin = real_pin(d)
        _update(folder, extra)  # an update committed after the run pinned the header, before the model loads
        return pin

    monkeypatch.setattr(runs, "pin_model", pin_then_update)
    inputs = [str(small_train / "test" / "scratch"), str(small_train / "test" / "good")]
    code, _, err = run_cli(["predict", str(folder), *inputs, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    old, new = Spade.load(before), Spade.load(folder)
    assert len(new.history_) == len(old.history_) + 1
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    header = json.loads((before / "model.json").read_text())
    assert (run["generation"], run["lineage"], run["header_sha256"]) == (
        header["generation"], header["lineage"], header["header_sha256"])
    assert (run["image_threshold"], run["pixel_threshold"]) == (old.image_threshold_, old.pixel_threshold_)
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    expected = old.predict([r["file"] for r in rows])
    assert [r["generation"] for r in rows] == [header["generation"]] * len(rows)
    assert [r["score"] for r in rows] == [float(s) for s in expected.scores]
    assert [r["verdict"] for r in rows] == [res.verdict for res in expected]
    assert [float(s) for s in new.predict([r["file"] for r in rows]).scores] != [r["score"] for r in rows]

    # once the pinned generation is no longer kept (more updates than the folder keeps), one clear line
    def pin_then_update_many(d: str | Path) -> runs.ModelPin:
        pin = real_pin(d)
        _update(folder, extra, times=6)
        return pin

    monkeypatch.setattr(runs, "pin_model", pin_then_update_many)
    code, _, err = run_cli(["predict", str(folder), *inputs, "--out", str(tmp_path / "o2")], capsys)
    line = " ".join(err.split())
    assert code == 2 and "Traceback" not in err
    assert "the model was updated during this run and generation" in line and "no longer kept" in line
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ the output folder
def test_run_json_lists_this_runs_files_apart_from_earlier_ones(model_dir: Path, small_train: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    code, _, _ = run_cli(["predict", str(model_dir), str(small_train / "test" / "scratch"), "--out", str(out)],
                         capsys)
    assert code == 0
    first = json.loads((out / "run.json").read_text())["outputs"]
    code, _, _ = run_cli(["predict", str(model_dir), str(small_train / "test" / "blob"), "--out", str(out)], capsys)
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(run["outputs"]) == sorted(r[k] for r in rows for k in ("overlay", "map", "mask"))
    assert sorted(run["previous_outputs"]) == sorted(first) and not set(first) & set(run["outputs"])
    # a third run into OUT still owns both runs' files: no --overwrite needed
    code, _, err = run_cli(["predict", str(model_dir), str(small_train / "test" / "good"), "--out", str(out)], capsys)
    assert code == 0, err
    assert len(json.loads((out / "run.json").read_text())["previous_outputs"]) == len(first) + len(run["outputs"])


def test_broken_links_in_a_folder_are_reported(model_dir: Path, small_train: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(small_train / "test" / "good" / "000.png", src / "a.png")
    os.symlink(tmp_path / "gone.png", src / "b.png")
    os.symlink(src / "c.png", src / "c.png")  # a loop
    code, _, err = run_cli(["predict", str(model_dir), str(src), "--out", str(tmp_path / "stop")], capsys)
    assert code == 2 and f"error: {src / 'b.png'}: broken symbolic link" in " ".join(err.split())
    assert not (tmp_path / "stop").exists()  # stopped before writing anything
    code, _, err = run_cli(["predict", str(model_dir), str(src), "--out", str(tmp_path / "skip"), "--on-error", "skip"],
                           capsys)
    assert code == 2 and "2 of 3 images could not be read" in " ".join(err.split())
    rows = [json.loads(x) for x in (tmp_path / "skip" / "predictions.jsonl").read_text().splitlines()]
    assert [r.get("error") for r in rows] == [None, f"{src / 'b.png'}: broken symbolic link",
                                              f"{src / 'c.png'}: symbolic link loop"]


# ------------------------------------------------------------------ predictions.jsonl and run.json writes
def test_row_writer_appends_in_input_order_once_per_input(tmp_path: Path) -> None:
    w = runs.RowWriter(tmp_path, 5)
    w.open()
    lines = [json.dumps({"file": f"f{i}", "verdict": "good"}) + "\n" for i in range(5)]
    for i in (3, 1, 0, 3, 2):  # out of order, 3 delivered twice
        w.add(i, lines[i])
    w.flush()
    assert (tmp_path / "predictions.jsonl").read_text() == "".join(lines[:4])  # 0..3 written, none waiting
    assert w.n_rows == 4 and not w.spooled
    w.add(4, lines[4])
    w.close(interrupted=False)
    assert (tmp_path / "predictions.jsonl").read_text() == "".join(lines)
    assert w.size == len("".join(lines).encode()) and [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]


def test_interrupted_writer_keeps_whole_rows_in_order(tmp_path: Path) -> None:
    w = runs.RowWriter(tmp_path, 4)
    w.open()
    lines = [json.dumps({"file": f"f{i}"}) + "\n" for i in range(4)]
    for i in (0, 3, 2):
        w.add(i, lines[i])  # 1 never comes
    w.fh.write(b'{"file": "half')  # a write cut short
    w.close(interrupted=True)
    assert (tmp_path / "predictions.jsonl").read_text() == lines[0] + lines[2] + lines[3]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]  # the spool is gone


def test_each_file_of_a_run_is_written_a_fixed_number_of_times(model_dir: Path, small_train: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import spade_ad_runtime.io as io  # where the io functions live (spade_ad.io re-exports them)

    writes: list[str] = []
    real = io.atomic_write

    def counting(path: str | Path, write: object) -> Path:
        writes.append(Path(path).name)
        return real(path, write)  # type: ignore[arg-type]

    monkeypatch.setattr(io, "atomic_write", counting)
    appended: list[int] = []
    real_append = runs.RowWriter._append
    monkeypatch.setattr(runs.RowWriter, "_append", lambda self, data: (appended.append(len(data)),
                                                                       real_append(self, data))[1])
    inputs = [small_train / "test" / d for d in ("good", "scratch", "blob")]
    summary = runs.predict(model_dir, inputs, tmp_path / "o", batch_size=1)  # one chunk per image
    rows = (tmp_path / "o" / "predictions.jsonl").read_bytes()
    assert summary.n_rows == len(rows.splitlines()) > 3
    assert writes.count("run.json") == 2 and writes.count("predictions.jsonl") == 1  # whatever the number of chunks
    assert sum(appended) == len(rows)  # every row appended once: bytes written grow linearly


# ------------------------------------------------------------------ help texts
def test_help_texts_keep_their_square_brackets(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from spade_ad.delivery import cli

    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: nothing wrapped
    monkeypatch.setenv("TERMINAL_WIDTH", "2000")
    root = typer.main.get_command(cli.app)  # the help texts as written in the source
    checked = 0
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        bracketed = {m for t in texts for m in re.findall(r"\[[^\[\]]+\]", t)}
        code, out, err = run_cli([name, "--help"], capsys)
        assert code == 0, err
        shown = " ".join(out.split())
        for b in bracketed:
            assert " ".join(b.split()) in shown, f"spade-ad {name} --help lost {b!r}"
            checked += 1
    assert checked >= 2  # (at least [ray] on fit and predict)
    code, out, _ = run_cli(["predict", "--help"], capsys)
    assert "pip install 'spade-ad[ray]'" in out
