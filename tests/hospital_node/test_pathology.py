"""Pathology tile checks."""

from __future__ import annotations

from pathlib import Path

from dicom_writer import write_tile

from hospital_node.pathology import read_tile


def _code(tile) -> set[str]:
    return {p.code for p in tile.problems}


def test_rgb_and_rgba_ok(tmp_path: Path) -> None:
    write_tile(tmp_path / "a.png")
    write_tile(tmp_path / "b.png", mode="RGBA")
    for name in ("a.png", "b.png"):
        t = read_tile(tmp_path / name, name)
        assert t.usable and t.rgb.shape == (96, 96, 3)


def test_bad_tiles(tmp_path: Path) -> None:
    write_tile(tmp_path / "g.png", mode="L")
    write_tile(tmp_path / "s.png", size=40)
    (tmp_path / "x.png").write_bytes(b"not an image at all")
    write_tile(tmp_path / "t.png", size=200)
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 3])
    assert "path.not_rgb" in _code(read_tile(tmp_path / "g.png", "g.png"))
    assert "path.too_small" in _code(read_tile(tmp_path / "s.png", "s.png"))
    assert "path.unreadable" in _code(read_tile(tmp_path / "x.png", "x.png"))
    assert "path.unreadable" in _code(read_tile(tmp_path / "t.png", "t.png"))
