"""The README's python blocks run as written, in order, in a fresh interpreter."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__readme__"}
for number, block in enumerate(blocks):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README.md python block {number + 1}", "exec"), namespace)
    except BaseException:
        print(json.dumps({"block": number + 1, "error": traceback.format_exc()}))
        sys.exit(1)
    print(json.dumps({"block": number + 1, "stdout": out.getvalue()}))
"""


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_python_block_runs_in_order_as_written():
    """One namespace, as a reader pasting the blocks into one notebook would have; a subprocess, because blocks
    may change process-wide settings (``jdrop.masks.set_bits_lowering``), with the 8 CPU devices that the
    sequence-parallel recipe asks a CPU reader to simulate (``--xla_force_host_platform_device_count=8``)."""
    blocks = python_blocks()
    assert len(blocks) >= 4, "README.md lost python blocks"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if "error" in r]
    assert not failed and done.returncode == 0, failed[0]["error"] if failed else done.stderr[-3000:]
    assert len(results) == len(blocks)
    loss, accuracy = results[0]["stdout"].split()  # the quickstart prints the loss and the eval accuracy
    assert float(loss) > 0.0
    assert 0.0 <= float(accuracy) <= 1.0


def test_readme_shows_the_two_commands_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")
