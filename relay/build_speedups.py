"""Compile derp-relay's per-packet modules with mypyc: the build ``derprelay.speedups`` looks for.

The modules named in ``derprelay.speedups.COMPILED_MODULES`` are compiled from
a copy of the package's source (so mypy's cache and mypyc's C files stay out
of the checkout) into a directory ``derprelay_speedups`` holding the extension
modules and a manifest of the source digest, the Python and the mypyc that
made them.  Two ways to run it:

``--cache DIR``
    (``make speedups``) build into ``DIR/<key>`` unless it is there already,
    the key hashing the source, this script, the Python and mypyc; then link
    that build into the running interpreter's environment with a ``.pth``
    file.  A changed source is a new key, so stale builds are never linked.
``--into DIR``
    (the relay image) build straight into ``DIR``, e.g. the site-packages of
    the environment the relay runs from.

Needs mypy (whose wheel carries mypyc), setuptools, a C compiler and the
Python headers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from mypy.version import __version__ as mypyc_version
from mypyc.build import mypycify
from setuptools import setup

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "derprelay"
sys.path.insert(0, str(HERE))

from derprelay import speedups  # noqa: E402  (the package's own list of modules and names)

PTH_FILE = "derprelay-speedups.pth"


def build_key() -> str:
    """The cache key: everything a build depends on."""
    parts = [
        speedups.source_digest(PACKAGE),
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        speedups.python_tag(),
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        mypyc_version,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def compile_into(target: Path, python_executable: str) -> None:
    """Compile the modules and leave ``target/derprelay_speedups`` (replacing an older one)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="derprelay-speedups-") as tmp:
        work = Path(tmp)
        source = work / "src"
        shutil.copytree(PACKAGE, source / "derprelay", ignore=shutil.ignore_patterns("__pycache__"))
        cwd = Path.cwd()
        os.chdir(source)  # mypy names the modules by their path from here: derprelay.frames, ...
        try:
            extensions = mypycify(
                [
                    *(f"derprelay/{name}.py" for name in speedups.COMPILED_MODULES),
                    "--cache-dir",
                    str(work / "mypy-cache"),
                    "--python-executable",
                    python_executable,
                    "--ignore-missing-imports",  # nacl, prometheus_client, uvloop ship no types
                ],
                group_name=speedups.GROUP_NAME,
                target_dir=str(work / "c"),
            )
            setup(
                name="derprelay-speedups",
                ext_modules=extensions,
                script_args=[
                    "--quiet",
                    "build_ext",
                    "--parallel",
                    str(os.cpu_count() or 1),
                    "--build-lib",
                    str(work / "lib"),
                    "--build-temp",
                    str(work / "obj"),
                ],
            )
        finally:
            os.chdir(cwd)
        partial = target / (speedups.DIRECTORY + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for built in (work / "lib" / "derprelay").iterdir():
            shutil.move(built, partial / built.name)
        manifest = {
            "source": speedups.source_digest(PACKAGE),
            "python": speedups.python_tag(),
            "mypyc": mypyc_version,
            "modules": list(speedups.COMPILED_MODULES),
        }
        (partial / speedups.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        final = target / speedups.DIRECTORY
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    print(
        f">> compiled {', '.join(speedups.COMPILED_MODULES)} with mypyc in {time.monotonic() - started:.0f}s"
    )


def link(build: Path) -> None:
    """Put ``build`` on the running environment's ``sys.path`` (a ``.pth`` file in its site-packages)."""
    site_packages = Path(sysconfig.get_path("purelib"))
    (site_packages / PTH_FILE).write_text(f"{build}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cache", type=Path, help="build (once per key) under this directory, and link it")
    where.add_argument("--into", type=Path, help="build into this directory (e.g. site-packages)")
    parser.add_argument(
        "--python-executable",
        default=sys.executable,
        help="the Python whose installed packages mypy type-checks against (default: this one)",
    )
    args = parser.parse_args()
    if args.into is not None:
        compile_into(args.into, args.python_executable)
        return
    build = args.cache.resolve() / build_key()
    if (build / speedups.DIRECTORY / speedups.MANIFEST).is_file():
        print(f">> speedups: the compiled build of this source is cached in {build}")
    else:
        compile_into(build, args.python_executable)
    link(build)


if __name__ == "__main__":
    main()
