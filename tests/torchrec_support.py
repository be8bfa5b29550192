"""Whether torchrec is importable, and the skip marker the torchrec tests share (CI installs
torchrec, so there these tests run; elsewhere they skip with the install hint)."""
import pytest

try:
    import torchrec  # noqa: F401
    HAVE_TORCHREC = True
except ImportError:
    HAVE_TORCHREC = False

needs_torchrec = pytest.mark.skipif(
    not HAVE_TORCHREC, reason="torchrec is not installed (pip install -e '.[torchrec]'; CPU: "
                              "fbgemm-gpu-cpu + torchrec --no-deps, see README)")
