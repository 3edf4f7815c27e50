"""A short soak of eager ops and bridge round trips (tools/soak_ops.py runs a million): RSS stays
flat after the warm-up, so nothing leaks per op."""
import json
import os
import subprocess
import sys

import pytest

SOAK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                    "soak_ops.py")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif(not os.path.exists(SOAK), reason="tools/soak_ops.py is not beside tests/")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under ASan (tools/sanitize.sh) RSS is no measure of leaks: its "
                           "quarantine keeps freed memory")
def test_eager_ops_and_bridge_round_trips_do_not_grow_rss(tmp_path):
    out = tmp_path / "soak.json"
    # 150K ops and round trips: 6-15 s here; a leak of 16 bytes per op would show as 0.6%
    subprocess.run([sys.executable, SOAK, "--ops", "150000", "--max-growth", "0.02",
                    "--json", str(out)], check=False, timeout=300, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["mlx_active_end"] == result["mlx_active_after_warmup"], result
    assert result["ok"], result
