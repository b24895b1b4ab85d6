"""The llmctl base image: a distroless-style root filesystem built from Debian .debs, without debootstrap.

No container registry is reachable here, so the base is assembled from Debian's archive (which is):

1. the pinned packages of ``images/base/packages.txt`` are fetched with ``apt-get download`` into a
   cache directory (``~/.cache/llmctl/debs``) and unpacked one by one with ``dpkg-deb -x`` (maintainer
   scripts never run), merged into a ``/usr``-merged tree (``/bin``, ``/lib``, ``/lib64``, ``/sbin`` are
   symlinks into ``/usr``, as on Debian 12);
2. what a server never needs is pruned (documentation, man pages, locales, the stdlib's test suite,
   idlelib, tkinter, ensurepip, lib2to3, pydoc_data, ``__pycache__``...);
3. ``/etc/passwd``, ``/etc/group`` (user and group ``llmctl``, 65532), ``/tmp`` (1777) and
   ``/usr/bin/python3 -> python3.11`` are added;
4. the runtime's Python dependencies, pinned in ``images/base/requirements.txt``, are installed from
   manylinux wheels with the host's pip into ``/usr/lib/python3/dist-packages`` (``--no-deps``: the pin
   list is the complete closure) and their tests and type stubs are pruned.

`build_rootfs` does all of it into a directory and returns a `BuildReport` (per-package sizes, total);
`cached_rootfs` keeps one built tree per input hash so that rebuilding is only done when an input changes;
`rootfs_entries` turns the tree into `registry.oci.Entry` values (numeric owner root, modes as unpacked,
setuid/setgid bits dropped) for a reproducible layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from manager import paths
from manager.errors import LlmctlError
from registry.oci import Entry

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images" / "base"
PACKAGES_FILE = IMAGES_DIR / "packages.txt"
REQUIREMENTS_FILE = IMAGES_DIR / "requirements.txt"

USER_ID = 65532
USER_NAME = "llmctl"
PYTHON_SITE = "usr/lib/python3/dist-packages"
PYTHON_STDLIB = "usr/lib/python3.11"

# What the runtime imports; their dependency closure (minus EXCLUDED_DISTS) is requirements.txt.
RUNTIME_DISTS = ("numpy", "tokenizers", "starlette", "uvicorn", "prometheus-client")
# tokenizers depends on huggingface-hub only for Tokenizer.from_pretrained (downloads); the runtime
# reads its tokenizer from the GGUF file, so the hub client and its tree (requests, fsspec, tqdm,
# pyyaml, filelock, hf-xet...) stay out of the image.
EXCLUDED_DISTS = frozenset({"huggingface-hub"})

# usr-merge: top-level directories of a .deb that live under /usr on Debian 12.
_USR_MERGED = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")

# Paths (relative to the rootfs) removed after unpacking the Debian packages.
_PRUNE_DEB_DIRS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/gdb",
    "usr/share/binfmts",
    "usr/share/applications",
    "usr/share/pixmaps",
    "usr/share/python3",
    "usr/lib/x86_64-linux-gnu/gconv",  # iconv charsets; Python's codecs do not use them
    "usr/lib/x86_64-linux-gnu/audit",
    "usr/libexec/getconf",
    "usr/share/bug",
    "etc/ld.so.conf.d",
    f"{PYTHON_STDLIB}/test",
    f"{PYTHON_STDLIB}/idlelib",
    f"{PYTHON_STDLIB}/tkinter",
    f"{PYTHON_STDLIB}/turtledemo",
    f"{PYTHON_STDLIB}/ensurepip",
    f"{PYTHON_STDLIB}/lib2to3",
    f"{PYTHON_STDLIB}/pydoc_data",
    f"{PYTHON_STDLIB}/distutils",
    f"{PYTHON_STDLIB}/venv",
    f"{PYTHON_STDLIB}/unittest/test",
    f"{PYTHON_STDLIB}/sqlite3/test",
    f"{PYTHON_STDLIB}/ctypes/test",
    f"{PYTHON_STDLIB}/config-3.11-x86_64-linux-gnu",
    f"{PYTHON_STDLIB}/curses",
    f"{PYTHON_STDLIB}/sqlite3",
    f"{PYTHON_STDLIB}/dbm/ndbm.py",
)
# Single files and globs (relative to the rootfs) removed after unpacking the Debian packages.
_PRUNE_DEB_GLOBS = (
    "usr/bin/*",  # re-added below: only the interpreter is kept
    "usr/sbin/*",
    f"{PYTHON_STDLIB}/turtle.py",
    f"{PYTHON_STDLIB}/pydoc.py",
    "usr/lib/x86_64-linux-gnu/engines-3",
    "usr/lib/x86_64-linux-gnu/ossl-modules/legacy.so",
    # stdlib extension modules whose libraries are not in the image (libsqlite3, libncursesw, libreadline,
    # libdb, libnsl, libcrypt, libuuid): importing them fails cleanly with "No module named ...".
    *(
        f"{PYTHON_STDLIB}/lib-dynload/{m}.cpython-311-x86_64-linux-gnu.so"
        for m in ("_sqlite3", "_curses", "_curses_panel", "readline", "_dbm", "nis", "_crypt", "_uuid")
    ),
    # CPython's own test extension modules
    *(f"{PYTHON_STDLIB}/lib-dynload/{g}" for g in ("_test*", "_ctypes_test*", "_xxtestfuzz*", "xxlimited*")),
)
_KEEP_BINARIES = ("usr/bin/python3.11",)

# Inside Python dependencies: removed after pip install.
_PRUNE_PY_DIR_NAMES = frozenset({"tests", "testing_data", "__pycache__"})
_PRUNE_PY_SUFFIXES = (".pyi", ".pyc", ".pyx", ".pxd", ".h", ".c", ".a")
_PRUNE_PY_PATHS = (
    "numpy/_core/include",  # C headers for building extensions
    "numpy/_core/lib",  # npymath static library and pkg-config file
    "numpy/_pyinstaller",
    "numpy/f2py",  # the Fortran wrapper generator, a build tool
    "numpy/typing/tests",
    "bin",  # console scripts (uvicorn, f2py...) with the build host's interpreter path
)


class BaseImageError(LlmctlError):
    """The base root filesystem could not be built (a package could not be fetched, unpacked or installed)."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


@dataclass
class BuildReport:
    """Sizes (bytes, apparent size of regular files and symlinks) of what ended up in the rootfs."""

    debian: dict[str, int] = field(default_factory=dict)
    python: dict[str, int] = field(default_factory=dict)
    bytecode: int = 0  # the .pyc files of the stdlib and the wheels (see byte_compile)
    extra: int = 0
    total: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "debian": self.debian,
            "python": self.python,
            "bytecode": self.bytecode,
            "extra": self.extra,
            "total": self.total,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> BuildReport:
        debian = data.get("debian", {})
        python = data.get("python", {})
        bytecode = data.get("bytecode", 0)
        extra = data.get("extra", 0)
        total = data.get("total", 0)
        assert isinstance(debian, dict) and isinstance(python, dict)
        assert isinstance(bytecode, int) and isinstance(extra, int) and isinstance(total, int)
        return cls(dict(debian), dict(python), bytecode, extra, total)


# -- inputs ----------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BaseImageError(f"cannot read {path}: {e.strerror}") from e
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def read_packages(path: Path = PACKAGES_FILE) -> list[Package]:
    """The pinned `name=version` lines of a package list (comments and blank lines ignored)."""
    packages = []
    for number, line in enumerate(_lines(path), start=1):
        name, sep, version = line.partition("=")
        if not sep or not name or not version or " " in line:
            raise BaseImageError(f"{path}: entry {number} {line!r} is not `name=version` (pin every package)")
        packages.append(Package(name, version))
    return packages


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """The `name==version` lines of the requirements file (each must be pinned exactly)."""
    reqs = _lines(path)
    for req in reqs:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", req):
            raise BaseImageError(f"{path}: {req!r} is not pinned as `name==version`")
    return reqs


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_requirements(roots: Iterable[str] = RUNTIME_DISTS) -> list[str]:
    """The installed dependency closure of `roots` in this interpreter, as `name==version`, sorted.

    Used to (re)write requirements.txt from the development venv; extras are not followed and
    `EXCLUDED_DISTS` are left out with everything only they need.
    """
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef,assignment]

    seen: dict[str, str] = {}
    todo = [_normalize(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in EXCLUDED_DISTS:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            raise BaseImageError(f"{name} is not installed in {sys.prefix}; install the project first") from e
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            # markers are evaluated for this interpreter: the image's Python is also 3.11 on Linux
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_normalize(req.name))
    return [f"{name}=={version}" for name, version in sorted(seen.items())]


def inputs_digest(packages_file: Path = PACKAGES_FILE, requirements_file: Path = REQUIREMENTS_FILE) -> str:
    """sha256 over the package list, the requirements, this module (its pruning rules) and the host's
    Python version (which compiles the image's .pyc files)."""
    h = hashlib.sha256(f"python {sys.version}\n".encode())
    for path in (packages_file, requirements_file, Path(__file__)):
        data = path.read_bytes()
        h.update(f"{path.name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


# -- Debian packages -------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], what: str, *, cwd: Path | None = None, timeout: int = 600) -> str:
    try:
        result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise BaseImageError(f"{what}: {cmd[0]} is not installed (it is needed to build the base image)") from e
    except subprocess.TimeoutExpired as e:
        raise BaseImageError(f"{what}: {cmd[0]} did not finish within {timeout} s") from e
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise BaseImageError(f"{what} failed (exit {result.returncode}): {' | '.join(detail)}")
    return result.stdout


def _deb_name(package: Package) -> str:
    # apt-get download writes name_version_arch.deb with ':' in the version escaped as %3a.
    return f"{package.name}_{package.version.replace(':', '%3a')}_"


def _cached_deb(cache: Path, package: Package) -> Path | None:
    found = sorted(p for p in cache.glob(f"{_deb_name(package)}*.deb") if p.is_file())
    return found[0] if found else None


def download_debs(
    packages: Sequence[Package], cache: Path | None = None, *, allow_newer: bool = False
) -> dict[str, Path]:
    """Each package's .deb in `cache` (default ``~/.cache/llmctl/debs``), downloading the missing ones.

    Runs ``apt-get update`` once if a download fails (a fresh machine has no package lists).
    Debian drops superseded versions from its archive: with `allow_newer`, a pinned version that
    cannot be had is replaced by the archive's current one, with a warning on stderr (the result
    is then no longer the pinned image; tests use it, releases do not).
    """
    cache = cache if cache is not None else paths.cache_dir() / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if _cached_deb(cache, p) is None]
    if missing:
        cmd = ["apt-get", "download", *(p.spec for p in missing)]
        try:
            _run(cmd, "apt-get download", cwd=cache)
        except BaseImageError:
            _run(["apt-get", "update"], "apt-get update")
            try:
                _run(cmd, "apt-get download", cwd=cache)
            except BaseImageError as e:
                if not allow_newer:
                    raise BaseImageError(
                        f"{e}; a pinned version may have left the Debian archive: update {PACKAGES_FILE}"
                    ) from e
                for p in missing:
                    if _cached_deb(cache, p) is None:
                        print(f"warning: {p.spec} is not in the archive; using its current version", file=sys.stderr)
                        _run(["apt-get", "download", p.name], "apt-get download", cwd=cache)
    result = {}
    for package in packages:
        deb = _cached_deb(cache, package)
        if deb is None and allow_newer:
            newest = sorted(cache.glob(f"{package.name}_*.deb"), key=lambda q: q.stat().st_mtime)
            deb = newest[-1] if newest else None
        if deb is None:
            raise BaseImageError(f"apt-get download {package.spec} gave no .deb in {cache}")
        result[package.name] = deb
    return result


def _usr_merged(rel: Path) -> Path:
    if rel.parts and rel.parts[0] in _USR_MERGED:
        return Path("usr", *rel.parts)
    return rel


def _merge_tree(src: Path, dest: Path) -> list[Path]:
    """Move everything in `src` into `dest` (usr-merged); return the relative paths of files and symlinks."""
    moved: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            rel = _usr_merged(path.relative_to(src))
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                same = (path.is_symlink() and target.is_symlink() and os.readlink(path) == os.readlink(target)) or (
                    not path.is_symlink() and target.is_file() and path.read_bytes() == target.read_bytes()
                )
                if not same:
                    raise BaseImageError(f"two packages ship different /{rel}")
                continue
            os.rename(path, target)
            moved.append(rel)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return moved


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _prune_debian(rootfs: Path) -> None:
    for rel in _PRUNE_DEB_DIRS:
        _remove(rootfs / rel)
    for pattern in _PRUNE_DEB_GLOBS:
        for path in rootfs.glob(pattern):
            if path.relative_to(rootfs).as_posix() not in _KEEP_BINARIES:
                _remove(path)
    for cache in rootfs.rglob("__pycache__"):
        _remove(cache)


def _size(path: Path) -> int:
    st = path.lstat()
    return st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else 0


def tree_size(root: Path) -> int:
    """Apparent size of every regular file and symlink under `root` (what `du -sb` counts, minus dirs)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            total += _size(Path(dirpath, name))
    return total


def _dpkg_status(rootfs: Path, controls: dict[str, str]) -> None:
    """One `var/lib/dpkg/status.d/<package>` stanza per package (the distroless convention): no dpkg
    runs in the image, but scanners and the SBOM can still see exactly what was installed."""
    status_d = rootfs / "var" / "lib" / "dpkg" / "status.d"
    status_d.mkdir(parents=True, exist_ok=True)
    for name, control in sorted(controls.items()):
        lines = control.rstrip("\n").splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("Package:")), 0) + 1
        lines.insert(at, "Status: install ok installed")
        (status_d / name).write_text("\n".join(lines) + "\n")


def _system_files(rootfs: Path) -> None:
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        f"root:x:0:0:root:/root:/sbin/nologin\n"
        f"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
        f"{USER_NAME}:x:{USER_ID}:{USER_ID}:{USER_NAME}:/home/{USER_NAME}:/sbin/nologin\n"
    )
    (etc / "group").write_text(f"root:x:0:\nnogroup:x:65534:\n{USER_NAME}:x:{USER_ID}:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    (etc / "os-release").write_text(
        'PRETTY_NAME="llmctl base (Debian GNU/Linux 12 packages)"\nNAME="llmctl base"\nID=llmctl-base\n'
        "ID_LIKE=debian\nVERSION_ID=12\n"
    )
    for name in ("tmp", "root", f"home/{USER_NAME}"):
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    python3 = rootfs / "usr" / "bin" / "python3"
    if not python3.is_symlink():
        python3.symlink_to("python3.11")
    for name in _USR_MERGED:
        if (rootfs / "usr" / name).is_dir() and not (rootfs / name).is_symlink():
            (rootfs / name).symlink_to(f"usr/{name}")


# -- Python dependencies ---------------------------------------------------------------------------------


def _pip_install(site: Path, requirements: Sequence[str]) -> None:
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location",
        "--target", str(site), "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
        "--abi", "cp311", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
        "--platform", "manylinux_2_17_x86_64", "--no-compile", "--no-deps", *requirements,
    ]  # fmt: skip
    _run(cmd, "pip install of the runtime's dependencies", timeout=1800)


def _dist_sizes(site: Path) -> dict[str, int]:
    """Per distribution: the size of the files its RECORD lists that are still present after pruning."""
    sizes: dict[str, int] = {}
    for info in sorted(site.glob("*.dist-info")):
        name = info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        total = 0
        record = info / "RECORD"
        if record.is_file():
            for line in record.read_text(encoding="utf-8").splitlines():
                rel = line.split(",", 1)[0]
                path = site / rel
                if rel and not rel.startswith("..") and (path.is_file() or path.is_symlink()):
                    total += _size(path)
        sizes[_normalize(name)] = total
    return sizes


def _prune_python(site: Path) -> None:
    for rel in _PRUNE_PY_PATHS:
        _remove(site / rel)
    for dirpath, dirnames, filenames in os.walk(site, topdown=True):
        for d in list(dirnames):
            if d in _PRUNE_PY_DIR_NAMES:
                shutil.rmtree(Path(dirpath, d))
                dirnames.remove(d)
        for f in filenames:
            if f.endswith(_PRUNE_PY_SUFFIXES):
                Path(dirpath, f).unlink()


def byte_compile(root: Path, dirs: Sequence[Path]) -> int:
    """Byte-compile the modules under `dirs` into their ``__pycache__``, named for their paths in the
    image (`root` is the image's /); returns the bytes of .pyc files there.

    The containers run with a read-only root, so without these Python compiled every module it
    imports at every start: importing the server took 1.3-1.6 s instead of 0.5 (docs/images.md).
    The .pyc files are reproducible: checked against their source by hash, not by timestamp
    (``unchecked-hash``), compiled in a fresh process in a fixed order with a fixed hash seed.
    Only a Python 3.11 host can make them (the image's Python reads ``cpython-311`` files only);
    another host builds the image without them.
    """
    if sys.version_info[:2] != (3, 11):
        print(f"warning: Python {sys.version.split()[0]} cannot byte-compile for the image's 3.11", file=sys.stderr)
        return 0
    cmd = ["env", "PYTHONHASHSEED=0", sys.executable, "-m", "compileall", "-q", "-j", "1",
           "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/", *map(str, dirs)]  # fmt: skip
    _run(cmd, "byte-compiling the image's Python modules", timeout=1800)
    return sum(_size(p) for d in dirs for p in d.rglob("__pycache__/*.pyc"))


# -- the build -------------------------------------------------------------------------------------------


def build_rootfs(
    rootfs: Path,
    *,
    packages_file: Path = PACKAGES_FILE,
    requirements_file: Path = REQUIREMENTS_FILE,
    deb_cache: Path | None = None,
    allow_newer: bool = False,
) -> BuildReport:
    """Build the base root filesystem into the empty or missing directory `rootfs`; return its sizes."""
    packages = read_packages(packages_file)
    requirements = read_requirements(requirements_file)
    debs = download_debs(packages, deb_cache, allow_newer=allow_newer)
    rootfs.mkdir(parents=True, exist_ok=True)
    if any(rootfs.iterdir()):
        raise BaseImageError(f"{rootfs} is not empty; the base rootfs is built into an empty directory")

    owners: dict[Path, str] = {}
    controls: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="llmctl-deb-", dir=rootfs.parent) as tmp:
        for package in packages:
            staging = Path(tmp) / package.name
            _run(["dpkg-deb", "-x", str(debs[package.name]), str(staging)], f"dpkg-deb -x {debs[package.name]}")
            for rel in _merge_tree(staging, rootfs):
                owners[rel] = package.name
            controls[package.name] = _run(["dpkg-deb", "-f", str(debs[package.name])], "dpkg-deb -f")
    _prune_debian(rootfs)
    _dpkg_status(rootfs, controls)

    report = BuildReport()
    for package in packages:
        report.debian[package.name] = 0
    for rel, name in owners.items():
        path = rootfs / rel
        if path.is_symlink() or path.exists():
            report.debian[name] += _size(path)

    site = rootfs / PYTHON_SITE
    site.mkdir(parents=True, exist_ok=True)
    _pip_install(site, requirements)
    _prune_python(site)
    report.python = _dist_sizes(site)

    report.bytecode = byte_compile(rootfs, [rootfs / PYTHON_STDLIB, site])

    _system_files(rootfs)
    report.total = tree_size(rootfs)
    report.extra = report.total - sum(report.debian.values()) - sum(report.python.values()) - report.bytecode
    (rootfs.parent / f"{rootfs.name}.report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def cached_rootfs(
    cache: Path | None = None, *, deb_cache: Path | None = None, allow_newer: bool = False
) -> tuple[Path, BuildReport]:
    """The base rootfs for the current inputs, built once per `inputs_digest` under `cache`.

    `cache` defaults to ``~/.cache/llmctl/base-rootfs``; each build lands in ``<digest>/rootfs`` by
    rename, so an interrupted build leaves nothing that looks complete.
    """
    cache = cache if cache is not None else paths.cache_dir() / "base-rootfs"
    key = inputs_digest()
    final = cache / key
    report_file = final / "rootfs.report.json"
    if (final / "rootfs").is_dir() and report_file.is_file():
        return final / "rootfs", BuildReport.from_json(json.loads(report_file.read_text()))
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=cache))
    try:
        report = build_rootfs(work / "rootfs", deb_cache=deb_cache, allow_newer=allow_newer)
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return final / "rootfs", report


def rootfs_entries(rootfs: Path, prefix: str = "", *, uid: int = 0, gid: int = 0) -> list[Entry]:
    """Layer entries for every directory, file and symlink under `rootfs` (placed under `prefix`).

    Owners are numeric `uid`/`gid` (root by default); modes are those on disk without setuid/setgid;
    hard links become separate files. Other file types (devices, fifos, sockets) are refused.
    """
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(rootfs).as_posix()
            target = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry.symlink(target, os.readlink(path), uid=uid, gid=gid))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry.dir(target, mode=mode, uid=uid, gid=gid))
            elif stat.S_ISREG(st.st_mode):
                entries.append(Entry.file(target, path, mode=mode, uid=uid, gid=gid))
            else:
                raise BaseImageError(f"{path} is neither a file, a directory nor a symlink")
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return entries


def format_report(report: BuildReport) -> str:
    """A Markdown table of the sizes, largest first."""
    rows = [("deb", n, s) for n, s in report.debian.items()] + [("wheel", n, s) for n, s in report.python.items()]
    rows.sort(key=lambda r: (-r[2], r[1]))
    lines = ["| kind | package | size (MB) |", "| --- | --- | ---: |"]
    lines += [f"| {kind} | {name} | {size / 1e6:.2f} |" for kind, name, size in rows]
    lines.append(f"| | byte-compiled modules (.pyc) | {report.bytecode / 1e6:.2f} |")
    lines.append(f"| | /etc, symlinks, pip metadata not in RECORD | {report.extra / 1e6:.2f} |")
    lines.append(f"| | **total** | **{report.total / 1e6:.2f}** |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m manager.base_image [--requirements]``: build (or reuse) the rootfs and print its sizes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--requirements"]:
        print("\n".join(resolve_requirements()))
        return 0
    rootfs, report = cached_rootfs()
    print(rootfs)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
