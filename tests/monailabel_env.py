"""Where the tests find MONAI Label (no tests in here).

MONAI Label is never installed into the project environment: `pip install monailabel` would replace torch and
numpy. `scripts/install_monailabel.sh .monailabel` puts a `--no-deps` copy (plus a torchvision stub) in
`<repo>/.monailabel`, or wherever `MONAI_WSL_MONAILABEL_DIR` points; this module appends that folder to the END of
`sys.path`, so the environment's torch / numpy / monai always win over anything in it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "MONAI_WSL_MONAILABEL_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = "monailabel not installed: run scripts/install_monailabel.sh .monailabel"


def monailabel_dir() -> Path:
    """The folder `scripts/install_monailabel.sh` installs into: `$MONAI_WSL_MONAILABEL_DIR` or `<repo>/.monailabel`."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".monailabel"


def monailabel_path() -> Path | None:
    """The MONAI Label folder if it holds an importable `monailabel` package (checked on disk, nothing imported)."""
    path = monailabel_dir()
    return path if (path / "monailabel" / "__init__.py").is_file() else None


def import_bundle_infer_task() -> type:
    """Return `monailabel.tasks.infer.bundle.BundleInferTask`, or skip the calling test when MONAI Label is absent.

    An install that is present but does not import raises ImportError (a broken install should not pass as a skip).
    The folder goes at the end of `sys.path` (once), so it can only add modules, never shadow the environment's.
    """
    import pytest

    path = monailabel_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    if str(path) not in sys.path:
        sys.path.append(str(path))
    try:
        from monailabel.tasks.infer.bundle import BundleInferTask
    except ImportError as e:  # installed but broken (stale pins, changed environment): fail loudly, do not skip
        raise ImportError(f"monailabel in {path} does not import; rerun scripts/install_monailabel.sh {path}") from e
    return BundleInferTask
