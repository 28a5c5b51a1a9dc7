"""Optional integrations stay optional: importing the package never needs transformers."""

import subprocess
import sys

_CHECK = """
import sys
sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
import robustloss_fast
from robustloss_fast.integrations.transformers import apply_robust_loss, RobustTrainerLoss
RobustTrainerLoss(robustloss_fast.DM())
assert sys.modules["transformers"] is None
print("ok")
"""


def test_package_and_integration_import_without_transformers():
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
